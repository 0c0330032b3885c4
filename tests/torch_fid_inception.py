"""pytorch-fid's FID Inception in torch (torchvision's Inception3 blocks with pytorch-fid's patches, written out so
torchvision is not needed), for the tests marked `torch` in fid_test.py."""

import torch
import torch.nn.functional as F
from torch import nn as tnn

torch.set_num_threads(2)


class TBasicConv2d(tnn.Module):
  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = tnn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = tnn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _fid_avg_pool(x):
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class TInceptionA(tnn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = TBasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = TBasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = TBasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = TBasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = TBasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = TBasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = TBasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_fid_avg_pool(x))], 1)


class TInceptionB(tnn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = TBasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = TBasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = TBasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = TBasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class TInceptionC(tnn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = TBasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = TBasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = TBasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = TBasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = TBasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = TBasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = TBasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = TBasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = TBasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = TBasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f"branch7x7dbl_{i}")(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_fid_avg_pool(x))], 1)


class TInceptionD(tnn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = TBasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = TBasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = TBasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = TBasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = TBasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = TBasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class TInceptionE(tnn.Module):
  def __init__(self, cin, pool):
    super().__init__()
    self.pool = pool
    self.branch1x1 = TBasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = TBasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = TBasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = TBasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = TBasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = TBasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = TBasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = TBasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = TBasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    if self.pool == "avg":
      bp = _fid_avg_pool(x)
    else:
      bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(bp)], 1)


class TFIDInception(tnn.Module):
  """`fid_inception_v3()` with pytorch-fid's InceptionV3 input handling."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = TBasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = TBasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = TBasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = TBasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = TBasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = TInceptionA(192, 32)
    self.Mixed_5c = TInceptionA(256, 64)
    self.Mixed_5d = TInceptionA(288, 64)
    self.Mixed_6a = TInceptionB(288)
    self.Mixed_6b = TInceptionC(768, 128)
    self.Mixed_6c = TInceptionC(768, 160)
    self.Mixed_6d = TInceptionC(768, 160)
    self.Mixed_6e = TInceptionC(768, 192)
    self.Mixed_7a = TInceptionD(768)
    self.Mixed_7b = TInceptionE(1280, "avg")
    self.Mixed_7c = TInceptionE(2048, "max")
    self.fc = tnn.Linear(2048, 1008)

  def forward(self, images_uint8_nhwc):
    x = images_uint8_nhwc.permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    pool = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
    return pool, pool @ self.fc.weight.T  # OpenAI's IS logits: no bias.


def _randomize(model: tnn.Module, seed: int = 0) -> None:
  """Random weights and BN statistics that keep activations O(1) through the net."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, tnn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif isinstance(m, tnn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=g))
        m.bias.copy_(0.1 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
      elif isinstance(m, tnn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g))
  model.eval()
