"""Evaluation: bits/dim, FID and Inception Score, rate–distortion, the digit-classifier metric."""
