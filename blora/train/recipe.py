"""B-LoRA training recipe: the settings (paper defaults), what gets an adapter, the per-step draws, the loss and
the optimizer's parameter groups. Pure torch; the host side lives in ``blora.host.train``.

The recipe (Frenkel et al., ECCV 2024): one image, rank 64, alpha = rank, AdamW lr 5e-5 constant, weight decay
1e-4, betas (0.9, 0.999), eps 1e-8, grad-norm clip 1.0, 1000 steps, batch 1, uniform integer timesteps, MSE on the
model's own prediction target, content and style blocks trained jointly, seed 0; down matrices drawn from a normal
distribution with std 1/rank, up matrices zero (diffusers' LoRALinearLayer).
"""
from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Mapping, Sequence

import torch

from ..arch.sdxl import ROLES, block_of, resolve_block
from ..errors import BLoRAError
from ..adapters.kinds.lora import INITIALISATIONS
from ..formats.files import DTYPES

# Preset name -> roles whose blocks get adapters. "custom" selects by layer_filter alone.
BLOCK_PRESETS: dict[str, tuple[str, ...]] = {
    "content+style": ("content", "style"),
    "content": ("content",),
    "style": ("style",),
    "content+style+layout": ("content", "style", "layout"),
    "custom": (),
}
ALGORITHMS = ("LoRA", "DoRA", "LoKr", "LoHa", "AdaLoRA")  # how each trains: blora.train.algorithms
LYCORIS_ALGORITHMS = ("LoKr", "LoHa")
OPTIMIZERS = ("AdamW", "SGD")
TRAINING_DTYPES = {name: DTYPES[name] for name in ("bf16", "fp16", "fp32")}  # in the node's order
SAVE_PRECISIONS = DTYPES
SEED_DRAWS = ("shared", "own")  # seeds > 1: every seed uses the draws of `seed`, or seed + n its own
# What backward recomputes instead of keeping: nothing; the transformer blocks holding trained layers (the
# default: about the minimal loop's memory at a few percent of step time); every layer from the first trained
# block to the output (the least memory, the most recomputation).
CHECKPOINTING = ("off", "trained blocks", "all above")

# The original trainer's targets inside an attention block: q, k, v, out of both attentions, nothing else.
ATTENTION_TARGET = re.compile(r"\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
EXAMPLE_PATH = "output_blocks.1.1.transformer_blocks.0.attn2.to_k"


def _choice(name: str, value, choices) -> str | None:
    return None if value in choices else f"`{name}` should be one of {', '.join(map(str, choices))}, got {value!r}."


def _at_least(name: str, value, low) -> str | None:
    return None if value >= low else f"`{name}` should be at least {low}, got {value!r}."


def _positive(name: str, value) -> str | None:
    return None if value > 0 and math.isfinite(value) else f"`{name}` should be a positive number, got {value!r}."


def _regex(name: str, value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as e:
        return f"`{name}` is not a valid regular expression ({e}), got {value!r}."
    return None


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the original B-LoRA recipe; every field is checked on creation.

    blocks: a BLOCK_PRESETS name; layer_filter: regex (re.search) over canonical module paths: with ``custom`` it
    selects the modules, otherwise it narrows the preset. rank/alpha: LoRA scale alpha/rank (alpha/sqrt(rank) with
    rslora). loraplus_ratio: learning-rate multiplier of the up matrices (LoRA+). steps: optimizer steps, each of
    grad_accumulation micro-batches of batch_size images. resolution: short side in pixels (aspect kept).
    save_every: checkpoint period in steps (0: only at the end). seeds: B-LoRAs trained at once, initialised from
    seed, seed + 1, … (``blora.host.train_seeds``); seed_draws: their timesteps and noise: ``shared`` (those of seed)
    or ``own`` (seed + n). gradient_checkpointing: a CHECKPOINTING name (True: "trained blocks", False: "off").
    offload: stream the frozen weights to the device layer by layer (the host's partial load) for small GPUs.
    LyCORIS (LoKr, LoHa): dora_wd adds DoRA's magnitude (input axis); lokr_factor splits dimensions for the
    Kronecker product (-1: most balanced), lokr_decompose_both factors w1 too, lokr_full_matrix keeps both factors
    full. AdaLoRA: rank is the initial rank, adalora_target_rank the average rank at the end (0: half the rank);
    adalora_warmup and adalora_final are the fractions of steps at the initial and the target budget,
    adalora_interval the steps between maskings, adalora_orth_reg the weight of the orthogonality regulariser
    (PEFT's default: 0.5).
    """

    blocks: str = "content+style"
    layer_filter: str = ""
    rank: int = 64
    alpha: float = 64.0
    algorithm: str = "LoRA"
    rslora: bool = False
    learning_rate: float = 5e-5
    loraplus_ratio: float = 1.0
    optimizer: str = "AdamW"
    weight_decay: float = 1e-4
    steps: int = 1000
    batch_size: int = 1
    grad_accumulation: int = 1
    resolution: int = 1024
    flip: bool = False
    random_crop: bool = False
    color_jitter: float = 0.0
    seed: int = 0
    init: str = "gaussian"
    training_dtype: str = "bf16"
    gradient_checkpointing: str = "trained blocks"
    save_every: int = 0
    save_precision: str = "fp16"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    seeds: int = 1
    seed_draws: str = "shared"
    dora_wd: bool = False
    lokr_factor: int = -1
    lokr_decompose_both: bool = False
    lokr_full_matrix: bool = False
    adalora_target_rank: int = 0
    adalora_warmup: float = 0.1
    adalora_final: float = 0.2
    adalora_interval: int = 10
    adalora_orth_reg: float = 0.5
    offload: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.gradient_checkpointing, bool):  # the node's old switch
            object.__setattr__(self, "gradient_checkpointing", "trained blocks" if self.gradient_checkpointing
                               else "off")
        problems = [
            _choice("blocks", self.blocks, BLOCK_PRESETS), _regex("layer_filter", self.layer_filter),
            _at_least("rank", self.rank, 1), _positive("alpha", self.alpha),
            _choice("algorithm", self.algorithm, ALGORITHMS), _positive("learning_rate", self.learning_rate),
            _positive("loraplus_ratio", self.loraplus_ratio), _choice("optimizer", self.optimizer, OPTIMIZERS),
            _at_least("weight_decay", self.weight_decay, 0.0), _at_least("steps", self.steps, 1),
            _at_least("batch_size", self.batch_size, 1), _at_least("grad_accumulation", self.grad_accumulation, 1),
            _at_least("resolution", self.resolution, 64), _at_least("seed", self.seed, 0),
            _choice("init", self.init, INITIALISATIONS), _at_least("color_jitter", self.color_jitter, 0.0),
            _choice("training_dtype", self.training_dtype, TRAINING_DTYPES),
            _choice("gradient_checkpointing", self.gradient_checkpointing, CHECKPOINTING),
            _at_least("save_every", self.save_every, 0),
            _choice("save_precision", self.save_precision, SAVE_PRECISIONS), _at_least("seeds", self.seeds, 1),
            _choice("seed_draws", self.seed_draws, SEED_DRAWS),
            _positive("eps", self.eps), _at_least("max_grad_norm", self.max_grad_norm, 0.0),
        ]
        if self.blocks == "custom" and not self.layer_filter.strip():
            problems.append("`layer_filter` is required with blocks 'custom' (a regex over module paths such as "
                            f"{EXAMPLE_PATH!r}), got ''.")
        problems += self._algorithm_problems()
        if not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(f"`betas` should be two numbers in [0, 1), got {self.betas!r}.")
        problems = [p for p in problems if p]
        if problems:
            raise BLoRAError("invalid training settings: " + " ".join(problems))

    def _algorithm_problems(self) -> list[str | None]:
        problems = [_at_least("adalora_interval", self.adalora_interval, 1),
                    _at_least("adalora_target_rank", self.adalora_target_rank, 0),
                    _at_least("adalora_orth_reg", self.adalora_orth_reg, 0.0)]
        if self.dora_wd and self.algorithm not in LYCORIS_ALGORITHMS:
            problems.append(f"`dora_wd` applies to {' and '.join(LYCORIS_ALGORITHMS)} (for LoRA choose algorithm "
                            f"DoRA), got algorithm {self.algorithm!r}.")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            problems.append(f"`lokr_factor` should be -1 (most balanced split) or a positive number, got "
                            f"{self.lokr_factor!r}.")
        if self.algorithm == "AdaLoRA":
            if self.adalora_target_rank > self.rank:
                problems.append(f"`adalora_target_rank` should be between 1 and rank ({self.rank}) (0: half the "
                                f"rank), got {self.adalora_target_rank!r}.")
            if not (0.0 <= self.adalora_warmup and 0.0 <= self.adalora_final
                    and self.adalora_warmup + self.adalora_final < 1.0):
                problems.append(f"`adalora_warmup` and `adalora_final` should be fractions of the steps adding up to "
                                f"less than 1, got {self.adalora_warmup!r} and {self.adalora_final!r}.")
        return problems

    @property
    def adalora_target(self) -> int:
        """AdaLoRA's target average rank: adalora_target_rank, or half the rank (at least 1) when it is 0."""
        return self.adalora_target_rank or max(1, self.rank // 2)

    @property
    def scale(self) -> float:
        """Multiplier of up @ down: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def stored_alpha(self) -> float:
        """The alpha a file stores so that alpha / rank loaders get ``scale`` (rsLoRA: alpha * sqrt(rank))."""
        return self.scale * self.rank

    @property
    def dtype(self) -> torch.dtype:
        return TRAINING_DTYPES[self.training_dtype]

    @property
    def roles(self) -> tuple[str, ...]:
        return BLOCK_PRESETS[self.blocks]

    def as_metadata(self) -> dict[str, str]:
        """Every setting as a string, keyed ``blora.train.<field>``."""
        return {f"blora.train.{f.name}": str(getattr(self, f.name)) for f in fields(self)}


def select_targets(module_paths: Iterable[str], config: TrainConfig) -> list[str]:
    """The canonical module paths that get an adapter, sorted. module_paths: the model's Linear layers.

    Presets: q/k/v/out of attn1 and attn2 in every transformer block of the preset's blocks, narrowed by
    layer_filter when given. ``custom``: every path layer_filter matches. Raises BLoRAError naming the filter
    when nothing is selected."""
    pattern = re.compile(config.layer_filter) if config.layer_filter else None
    blocks = {resolve_block(ROLES[role]) for role in config.roles}
    chosen = []
    for path in module_paths:
        if pattern is not None and not pattern.search(path):
            continue
        if config.blocks == "custom" or (block_of(path) in blocks and ATTENTION_TARGET.search(path)):
            chosen.append(path)
    if not chosen:
        what = f"layer_filter {config.layer_filter!r}" + ("" if config.blocks == "custom" else
                                                           f" within blocks {config.blocks!r}")
        raise BLoRAError(f"{what} matches no Linear layer of this model (module paths look like {EXAMPLE_PATH!r})")
    return sorted(chosen)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator for one training step: the draws of step s depend only on (seed, s), so a resumed or
    repeated run draws the same noise at the same step."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2 ** 63))


def sample_batch(num_images: int, batch_size: int, generator: torch.Generator) -> list[int]:
    """Image indices of one micro-batch: a random permutation (repeated when the batch exceeds the images)."""
    reps = -(-batch_size // num_images)
    order = torch.cat([torch.randperm(num_images, generator=generator) for _ in range(reps)])
    return order[:batch_size].tolist()


def sample_timesteps(batch_size: int, num_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_timesteps), shape (batch,), int64."""
    return torch.randint(0, num_timesteps, (batch_size,), generator=generator)


def sample_flips(batch_size: int, enabled: bool, generator: torch.Generator) -> list[bool]:
    """Which samples are mirrored horizontally (each with probability 1/2 when enabled). Always draws, so
    enabling flips does not change the other draws."""
    draws = torch.rand(batch_size, generator=generator)
    return [bool(d < 0.5) and enabled for d in draws]


def sample_noise(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise, float32 on the CPU."""
    return torch.randn(tuple(shape), generator=generator)


def _eps_target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return noise


def _v_target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    # x = x0 + sigma * noise; v = alpha_t * noise - sigma_t * x0 with alpha_t = 1/sqrt(1+s^2), sigma_t = s/sqrt(1+s^2)
    s = sigma.reshape(-1, *[1] * (x0.ndim - 1))
    return (noise - s * x0) / torch.sqrt(s * s + 1.0)


PREDICTION_TARGETS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "EPS": _eps_target,
    "V_PREDICTION": _v_target,
}


def training_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """What the model should output for x = x0 + sigma * noise: the noise (EPS) or v (V_PREDICTION).

    x0, noise: (B, C, H, W); sigma: (B,). Raises BLoRAError for other prediction types."""
    if prediction not in PREDICTION_TARGETS:
        raise BLoRAError(f"cannot train a {prediction} model: B-LoRA training supports "
                         f"{', '.join(PREDICTION_TARGETS)} prediction")
    return PREDICTION_TARGETS[prediction](x0, noise, sigma)


def diffusion_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 (no SNR weighting)."""
    return torch.nn.functional.mse_loss(output.float(), target.float())


def param_groups(adapters: Mapping[str, torch.nn.Module], config: TrainConfig) -> list[dict]:
    """Optimizer groups: every parameter at the learning rate, but the factors that start at zero (LoRA's up, an
    adapter's ``plus`` names) at ``loraplus_ratio`` times it (LoRA+). adapters: module path -> Trainable."""
    base, up = [], []
    for path in sorted(adapters):
        for name, p in adapters[path].named_parameters():
            (up if name in adapters[path].plus else base).append(p)
    return [{"params": base, "lr": config.learning_rate, "name": "down"},
            {"params": up, "lr": config.learning_rate * config.loraplus_ratio, "name": "up"}]


def _fused(groups: list[dict]) -> dict:
    """``fused=True`` where every parameter is on a CUDA device and this torch's AdamW has the fused kernel."""
    params = [p for g in groups for p in g["params"]]
    ok = params and all(p.is_cuda for p in params) and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return {"fused": True} if ok else {}


OPTIMIZER_FACTORIES: dict[str, Callable[[list[dict], TrainConfig], torch.optim.Optimizer]] = {
    "AdamW": lambda groups, c: torch.optim.AdamW(groups, lr=c.learning_rate, betas=c.betas, eps=c.eps,
                                                 weight_decay=c.weight_decay, **_fused(groups)),
    "SGD": lambda groups, c: torch.optim.SGD(groups, lr=c.learning_rate, weight_decay=c.weight_decay),
}


def make_optimizer(adapters: Mapping[str, torch.nn.Module], config: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the adapters' parameters, with LoRA+ groups."""
    return OPTIMIZER_FACTORIES[config.optimizer](param_groups(adapters, config), config)
