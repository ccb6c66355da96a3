"""Models and data shared by the benchmarks: the demo's small CNN and a compact ResNet-18, on random data.

The data are generated once per run as ready-made batches (no collate cost), so every arm of an A/B
comparison sees the same batches and the same initial weights for a given seed.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from trainwatch.demo import DigitsCNN


class Batches(Dataset):
    """A fixed list of (inputs, labels) batches; use with `DataLoader(batch_size=None)`."""

    def __init__(self, n_batches: int, batch_size: int, shape: tuple[int, ...], classes: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.batches = [
            (torch.randn(batch_size, *shape, generator=g), torch.randint(0, classes, (batch_size,), generator=g)) for _ in range(n_batches)
        ]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[i]


def loader(data: Batches) -> DataLoader:
    return DataLoader(data, batch_size=None, shuffle=False, num_workers=0)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (7x7/2 stem, max-pool, 4 stages of 2 basic blocks, 62 parameter
    tensors, 11.2M parameters with 10 classes); on 32x32 inputs the stages run at 8, 4, 2 and 1 pixels."""

    def __init__(self, classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin, stages = (64, 128, 256, 512), 64, []
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


class ResNetModule(pl.LightningModule):
    def __init__(self, classes: int = 10, lr: float = 0.05) -> None:
        super().__init__()
        self.net = ResNet18(classes)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


# name -> (module factory, input shape without batch, default batch size)
MODELS = {
    "small-cnn": (lambda: DigitsCNN(), (1, 8, 8), 64),
    "resnet18": (lambda: ResNetModule(), (3, 32, 32), 32),
}


def n_parameters(model: nn.Module) -> tuple[int, int]:
    params = [p for p in model.parameters() if p.requires_grad]
    return len(params), sum(p.numel() for p in params)
