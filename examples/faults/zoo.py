"""A fault zoo: small LightningModules with a planted problem, and the finding trainwatch must produce for each.

Run one or all (each trains on the CPU for a few dozen steps and prints the diagnosis):

    .venv/bin/python examples/faults/zoo.py              # every scenario
    .venv/bin/python examples/faults/zoo.py dead_relu    # one

Healthy baselines (residual CNN with BatchNorm, MLP with LayerNorm, GRU, 2-layer LSTM, a small transformer, a CNN
with GroupNorm and InstanceNorm) must produce none.
Data are generated in code: separable blobs, images whose class shifts their mean, token sequences whose class is
their most frequent token.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainwatch import TrainWatch


# --- data --------------------------------------------------------------------------------------------------------
def blobs(n: int = 512, dim: int = 16, classes: int = 4, scale: float = 1.0) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, dim, generator=g) * 2
    return TensorDataset(scale * (centres[y] + torch.randn(n, dim, generator=g)), y)


def images(n: int = 256, classes: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g) + 0.5 * y.view(-1, 1, 1, 1).float(), y)


def tokens(n: int = 512, length: int = 12, vocab: int = 16, classes: int = 4) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randint(0, vocab, (n, length), generator=g)
    x[:, ::2] = y.view(-1, 1)  # the class is the most frequent token
    return TensorDataset(x, y)


# --- the module every scenario trains ------------------------------------------------------------------------------
class Net(pl.LightningModule):
    """Cross-entropy classification of `net`, with the optimizer and learning rate of the scenario."""

    def __init__(self, net: nn.Module, lr: float = 1e-3, optimizer: str = "adam") -> None:
        super().__init__()
        self.net, self.lr, self.optimizer = net, lr, optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Detached(nn.Module):
    """A `.detach()` in the middle: nothing before it learns."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).detach())


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class Transformer(nn.Module):
    def __init__(self, vocab: int = 16, dim: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


class Recurrent(nn.Module):
    def __init__(self, vocab: int = 16, dim: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.embed(x))[0][:, -1])


class LSTMNet(nn.Module):
    def __init__(self, vocab: int = 16, dim: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.lstm(self.embed(x))[0][:, -1]))


def groupnorm_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.InstanceNorm2d(16, affine=True), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


def deep_sigmoid() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, 4))


def mlp(act: type[nn.Module] = nn.ReLU, norm: bool = False, width: int = 32) -> nn.Sequential:
    norm_layer = (lambda: nn.LayerNorm(width)) if norm else nn.Identity
    return nn.Sequential(nn.Linear(16, width), norm_layer(), act(), nn.Linear(width, width), norm_layer(), act(), nn.Linear(width, 4))


def dead_relu() -> nn.Module:
    net = mlp()
    with torch.no_grad():
        net[0].bias.fill_(-20.0)  # every pre-activation far below zero: the ReLU after it never fires
    return net


def bad_init() -> nn.Module:
    net = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(32, 32), nn.ReLU())])
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), net, nn.Linear(32, 4))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(5.0)  # 5x too large per layer: activations and gradients grow 5^k
    return net


def frozen_middle() -> nn.Module:
    net = mlp()
    net[3].requires_grad_(False)  # frozen by mistake between trainable layers
    return net


def small_resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Block(16), Block(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


# --- scenarios -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """A planted problem: the model, its data and optimizer, and the findings it must produce."""

    build: Callable[[], nn.Module]
    data: Callable[[], TensorDataset]
    expect: tuple[tuple[str, str], ...]  # (kind, group) that must be found; empty: a healthy run, nothing may be found
    also: tuple[tuple[str, str], ...] = ()  # findings that are true consequences of the planted problem
    lr: float = 1e-3
    optimizer: str = "adam"
    steps: int = 40
    within: int = 20  # every expected finding must appear within this many steps of the planted onset
    onset: int = 0  # the step at which the planted problem shows (0: from the start)
    watch: dict = field(default_factory=dict)


SCENARIOS: dict[str, Scenario] = {
    # 12 sigmoid layers: each multiplies the backward signal by at most 0.25
    "vanishing_sigmoid": Scenario(deep_sigmoid, blobs, (("vanishing_gradients", "*"),), within=10),
    # SGD at lr=1: every step moves the weights by >10% (update_ratio_high from the start), the gradient norm grows
    # ~100x within 4 steps from step ~11, then NaN at step ~18
    "exploding_lr": Scenario(
        lambda: mlp(),
        blobs,
        (("exploding_gradients", "*"), ("nonfinite_gradients", "*")),
        lr=1.0,
        optimizer="sgd",
        also=(("nonfinite_loss", "train_loss"), ("update_ratio_high", "*"), ("dead_units", "*")),
        onset=11,
        within=10,
    ),
    # weights 5x too large in 8 layers: the first gradient norm is ~2e3, then 2e6, then NaN at step ~4
    "bad_init": Scenario(
        bad_init,
        blobs,
        (("exploding_gradients", "*"), ("nonfinite_gradients", "*")),
        lr=1e-2,
        optimizer="sgd",
        also=(("nonfinite_loss", "train_loss"),),
        within=6,
    ),
    # the first ReLU never fires; the layer before it then gets no gradient and the next ReLU sees only its bias
    "dead_relu": Scenario(dead_relu, blobs, (("dead_units", "net.2"),), also=(("no_gradient", "net.0"), ("dead_units", "net.5")), within=6),
    "detached_branch": Scenario(Detached, blobs, (("no_gradient", "net.encoder.0"),), within=6),
    "frozen_layer": Scenario(frozen_middle, blobs, (("no_gradient", "net.3"),), within=0),
    "saturated_tanh": Scenario(lambda: mlp(nn.Tanh), lambda: blobs(scale=50.0), (("saturated_activations", "net.2"),), within=6),
    "healthy_resnet": Scenario(small_resnet, images, ()),
    "healthy_layernorm_mlp": Scenario(lambda: mlp(nn.GELU, norm=True), blobs, ()),
    "healthy_gru": Scenario(Recurrent, tokens, ()),
    "healthy_transformer": Scenario(Transformer, tokens, ()),
    "healthy_lstm": Scenario(LSTMNet, tokens, ()),
    "healthy_groupnorm_cnn": Scenario(groupnorm_cnn, images, ()),
}


def run(name: str, tracking_uri: str, seed: int = 0) -> dict:
    """Train scenario `name` with TrainWatch (gradients and activations every 2 steps) and return its diagnosis.json."""
    scenario = SCENARIOS[name]
    pl.seed_everything(seed, verbose=False)
    loader = DataLoader(scenario.data(), batch_size=32, shuffle=True)
    watch = TrainWatch(
        every_n_steps=2, activations_every_n_steps=2, tracking_uri=tracking_uri, experiment_name="fault-zoo", run_name=name,
        system_metrics=False, landscape_samples=0, **scenario.watch,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_steps=scenario.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.callbacks.append(watch)
    trainer.fit(Net(scenario.build(), scenario.lr, scenario.optimizer), loader)
    client = mlflow.MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(watch.run_id, "trainwatch/diagnosis.json", tmp)).read_text())


def matches(finding: dict, kind: str, group: str) -> bool:
    return finding["kind"] == kind and (group == "*" or finding["group"] == group)


def score(name: str, report: dict) -> dict[str, object]:
    """Recall: expected findings found in time; precision: findings that are expected or true consequences."""
    scenario = SCENARIOS[name]
    findings = report["findings"]
    late = scenario.onset + scenario.within
    hit = [any(matches(f, k, g) and f["first_step"] <= late for f in findings) for k, g in scenario.expect]
    explained = [any(matches(f, k, g) for k, g in scenario.expect + scenario.also) for f in findings]
    return {"expected": len(hit), "found": sum(hit), "findings": len(findings), "explained": sum(explained)}


def main(names: list[str]) -> None:
    totals = {"expected": 0, "found": 0, "findings": 0, "explained": 0}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or list(SCENARIOS):
            report = run(name, f"sqlite:///{tmp}/zoo.db")
            found = [(f["kind"], f["group"], f["first_step"]) for f in report["findings"]]
            result = score(name, report)
            totals = {k: totals[k] + result[k] for k in totals}  # type: ignore[operator]
            print(f"{name:24s} health={report['health']:8s} {result} found={found}")
    recall = totals["found"] / max(totals["expected"], 1)
    precision = totals["explained"] / max(totals["findings"], 1)
    print(
        f"recall {recall:.2f} ({totals['found']}/{totals['expected']}), precision {precision:.2f} ({totals['explained']}/{totals['findings']})"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
