"""Evaluation: bits/dim, FID and Inception Score, rate–distortion."""
