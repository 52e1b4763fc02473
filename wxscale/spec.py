"""The ScalingStudy resource: one typed model for the YAML file, the CLI and the CRD.

A study file has the shape of a Kubernetes custom resource::

    apiVersion: wxscale.io/v1alpha1
    kind: ScalingStudy
    metadata: {name: quickstart}
    spec: {data: ..., model: ..., training: ..., axes: [...]}

Field names in YAML are camelCase (the Kubernetes convention); Python attributes
are snake_case. Unknown fields are rejected everywhere. The CRD schema is
generated from these classes (`wxscale.crd`), so a field added here appears in
both places.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

API_VERSION = "wxscale.io/v1alpha1"
KIND = "ScalingStudy"

# Durations: a number and a unit. Hours, days and weeks are exact; months and
# years are calendar offsets, used only for temporal coverage.
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(h|d|w|mo|y)\s*$")
_EXACT_UNITS = {"h": 1.0, "d": 24.0, "w": 168.0}


def parse_duration(text: str) -> tuple[float, str]:
    """Parse '6h', '2d', '1w', '3mo' or '1y' into (amount, unit).

    Raises ValueError with the accepted forms when the text does not parse.
    """
    match = _DURATION_RE.match(str(text))
    if not match:
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit, "
            "h (hours), d (days), w (weeks), mo (months) or y (years), e.g. '6h' or '90d'"
        )
    return float(match.group(1)), match.group(2)


def duration_hours(text: str) -> float:
    """Return an exact duration ('6h', '2d', '1w') in hours; months and years are rejected."""
    amount, unit = parse_duration(text)
    if unit not in _EXACT_UNITS:
        raise ValueError(f"invalid duration {text!r}: use h, d or w here (months and years vary in length)")
    return amount * _EXACT_UNITS[unit]


def add_duration(start: pd.Timestamp, text: str) -> pd.Timestamp:
    """Return start + duration, with calendar arithmetic for months and years."""
    amount, unit = parse_duration(text)
    if unit in _EXACT_UNITS:
        return start + pd.Timedelta(hours=amount * _EXACT_UNITS[unit])
    if amount != int(amount):
        raise ValueError(f"invalid duration {text!r}: months and years must be whole numbers")
    if unit == "mo":
        return start + pd.DateOffset(months=int(amount))
    return start + pd.DateOffset(years=int(amount))


class Model(BaseModel):
    """Base for every spec class: camelCase aliases and no unknown fields."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        validate_assignment=True,
    )

    def dump(self) -> dict[str, Any]:
        """Return the YAML/JSON form: camelCase keys, defaults included."""
        return self.model_dump(mode="json", by_alias=True)


def _check_duration(value: str | None) -> str | None:
    if value is not None:
        parse_duration(value)
    return value


class TimeRange(Model):
    """A closed interval of valid times, e.g. {start: 2013-01-01, end: 2014-06-30T18:00}."""

    start: datetime = Field(description="First valid time (inclusive), ISO 8601.")
    end: datetime = Field(description="Last valid time (inclusive), ISO 8601. A date alone means 00:00 of that day.")

    @model_validator(mode="after")
    def _ordered(self) -> TimeRange:
        if self.end <= self.start:
            raise ValueError(f"end must be after start, got start={self.start.isoformat()} end={self.end.isoformat()}")
        return self

    def overlaps(self, other: TimeRange) -> bool:
        return self.start <= other.end and other.start <= self.end


class Region(Model):
    """A latitude-longitude box; longitudes in degrees east, either convention."""

    lat_min: float = Field(ge=-90, le=90, description="Southern edge, degrees north.")
    lat_max: float = Field(ge=-90, le=90, description="Northern edge, degrees north.")
    lon_min: float = Field(description="Western edge, degrees east (0-360 or -180-180).")
    lon_max: float = Field(description="Eastern edge, degrees east (0-360 or -180-180).")

    @model_validator(mode="after")
    def _ordered(self) -> Region:
        if self.lat_max <= self.lat_min:
            raise ValueError(f"latMax must be greater than latMin, got latMin={self.lat_min} latMax={self.lat_max}")
        return self


class SyntheticSpec(Model):
    """The built-in synthetic source: an advection-diffusion simulation on a periodic grid."""

    lat: int = Field(32, ge=4, le=1024, description="Grid points in latitude.")
    lon: int = Field(64, ge=4, le=2048, description="Grid points in longitude.")
    start: datetime = Field(datetime(2000, 1, 1), description="Time of the first generated step.")
    steps: int = Field(1460, ge=8, description="Number of time steps to generate (1460 = one year at 6 h).")
    step_hours: float = Field(6.0, gt=0, description="Hours between generated steps.")
    variables: list[str] = Field(
        default_factory=lambda: ["tracer"],
        min_length=1,
        description="Names of the generated fields; each is an independent tracer.",
    )


class StorageSpec(Model):
    """Object-storage settings. Credentials come from the environment, never from the spec."""

    endpoint_url: str | None = Field(None, description="S3 endpoint URL, e.g. http://minio:9000. Default: AWS.")
    anonymous: bool = Field(False, description="Read without credentials (public buckets).")


class LoaderSpec(Model):
    """How a trial reads its data: loaded into memory, or streamed from storage in chunk-aligned blocks."""

    mode: Literal["auto", "memory", "stream"] = Field(
        "auto",
        description="'memory' loads the time steps the samples use into RAM. 'stream' reads the training split from "
        "storage in blocks of whole time chunks while training; validation and test stay in memory. 'auto' streams "
        "when the float32 size of the training period exceeds streamAboveMB. The synthetic source is always in memory.",
    )
    stream_above_mb: float = Field(4096.0, gt=0, alias="streamAboveMB", description="Training-period size in MB above which 'auto' streams.")
    memory_mb: float = Field(
        1024.0,
        gt=0,
        alias="memoryMB",
        description="Memory budget of the streaming loader in MB: blocks being read, queued and shuffled. Blocks are "
        "sized in whole time chunks to fit it.",
    )
    block_mb: float = Field(64.0, gt=0, alias="blockMB", description="Target size of one block read in MB (float32 after cropping).")
    workers: int = Field(2, ge=1, le=64, description="Threads that read blocks in parallel.")
    prefetch: int = Field(4, ge=1, le=256, description="Blocks read ahead of training (the bounded queue).")
    shuffle_blocks: int = Field(4, ge=1, le=1024, description="Blocks whose samples are shuffled together.")
    stats_steps: int = Field(
        1024,
        ge=1,
        description="Training time steps read to estimate the normalisation statistics and the climatology when "
        "streaming, spread evenly over the training period; exact when the period has no more steps than this.",
    )
    cache_dir: str | None = Field(
        None,
        description="Local folder that caches the chunks of a zarr store, so that each chunk is fetched once per "
        "machine. The store must not change while it is cached.",
    )
    cache_limit_mb: float | None = Field(
        None, gt=0, alias="cacheLimitMB", description="Maximum size of the chunk cache in MB; the least recently used chunks are deleted to stay under it. Default no limit."
    )
    retries: int = Field(4, ge=0, le=20, description="Retries of a storage request that failed with a transient error.")
    retry_backoff_seconds: float = Field(
        0.5, gt=0, description="Delay before the first retry in seconds; it doubles with every retry, up to 30 s."
    )
    timeout_seconds: float = Field(
        120.0, gt=0, description="Timeout of one storage request in seconds; the wait for one block read is (retries + 2) times it."
    )
    missing_chunks: Literal["error", "fill"] = Field(
        "error",
        description="'error': a chunk missing from a zarr store fails the trial with the chunk's key. 'fill': read "
        "it as the fill value, for stores written without their empty chunks.",
    )


class DataSpec(Model):
    """Where the fields come from and how samples are cut from them."""

    source: str = Field(
        description="'synthetic', a local path, a file:// URL or an s3:// URL of a netCDF file or zarr store."
    )
    variables: list[str] | None = Field(
        None, description="Variables to train on; default all data variables on a (time, lat, lon) grid."
    )
    train: TimeRange = Field(description="Training period.")
    validation: TimeRange = Field(description="Validation period; must not overlap the others.")
    test: TimeRange = Field(description="Test period; must not overlap the others.")
    history: int = Field(1, ge=1, le=512, description="Input time steps per sample (the current one included).")
    history_interval: int = Field(
        1, ge=1, description="Steps between consecutive history inputs; history 4 with interval 4 spans a day at 6 h."
    )
    lead_time: str = Field("6h", description="Forecast lead time, e.g. '6h' or '1d'. Must be a multiple of the data step.")
    coarsen: int = Field(1, ge=1, le=64, description="Average blocks of coarsen x coarsen grid points (1 = native).")
    region: Region | None = Field(None, description="Regional crop; default the full domain.")
    dataset_fraction: float = Field(
        1.0, gt=0, le=1, description="Random, seeded fraction of training samples kept (dataset size axis)."
    )
    temporal_coverage: str | None = Field(
        None,
        description="Contiguous span of the training period used, counted from its start, e.g. '3mo' or '1y' "
        "(temporal coverage axis). Default the whole period.",
    )
    nan_policy: Literal["mask", "error"] = Field(
        "mask", description="'mask': NaN cells are left out of loss and metrics. 'error': stop on any NaN."
    )
    synthetic: SyntheticSpec = Field(default_factory=SyntheticSpec, description="Settings of the synthetic source.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Object-storage settings.")
    loader: LoaderSpec = Field(default_factory=LoaderSpec, description="How the data is read: in memory or streamed.")

    _lead = field_validator("lead_time")(lambda value: (duration_hours(value), value)[1])
    _coverage = field_validator("temporal_coverage")(_check_duration)

    @model_validator(mode="after")
    def _disjoint_periods(self) -> DataSpec:
        periods = {"train": self.train, "validation": self.validation, "test": self.test}
        names = list(periods)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                if periods[first].overlaps(periods[second]):
                    raise ValueError(
                        f"the {first} and {second} periods overlap "
                        f"({periods[first].start:%Y-%m-%d %H:%M}..{periods[first].end:%Y-%m-%d %H:%M} and "
                        f"{periods[second].start:%Y-%m-%d %H:%M}..{periods[second].end:%Y-%m-%d %H:%M}); "
                        "give each split its own, disjoint time range"
                    )
        return self

    @property
    def is_synthetic(self) -> bool:
        return self.source == "synthetic"


class ModelSpec(Model):
    """The Vision Transformer's shape."""

    patch_size: int = Field(4, ge=1, le=64, description="Patch edge in grid points (square patches).")
    depth: int = Field(4, ge=1, le=256, description="Transformer blocks.")
    heads: int = Field(4, ge=1, le=256, description="Attention heads per block.")
    embed_dim: int = Field(128, ge=8, le=16384, description="Embedding width; must be divisible by heads.")
    mlp_ratio: float = Field(4.0, gt=0, le=16, description="MLP hidden width / embedding width.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability in attention output and MLP.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSpec:
        if self.embed_dim % self.heads != 0:
            divisors = [n for n in range(1, self.embed_dim + 1) if self.embed_dim % n == 0 and n <= 64]
            raise ValueError(
                f"embedDim must be divisible by heads, got embedDim={self.embed_dim} heads={self.heads}; "
                f"use heads in {divisors} or an embedDim that is a multiple of every heads value on the axes"
            )
        return self


class OptimizerSpec(Model):
    """AdamW settings."""

    lr: float = Field(1e-3, gt=0, le=10, description="Peak learning rate.")
    weight_decay: float = Field(0.05, ge=0, description="Decoupled weight decay (AdamW).")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0, description="Maximum global gradient norm; null disables clipping.")


class ScheduleSpec(Model):
    """Learning-rate schedule: linear warm-up, then cosine decay or constant with a cool-down."""

    kind: Literal["cosine", "constant_cooldown"] = Field("cosine")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="Fraction of steps spent warming up.")
    cooldown_fraction: float = Field(0.2, ge=0, lt=1, description="Fraction of steps in the final linear cool-down.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate / peak learning rate.")


class BudgetSpec(Model):
    """Training length per trial: exactly one of steps, samples or flops."""

    steps: int | None = Field(None, ge=1, description="Optimizer steps.")
    samples: int | None = Field(None, ge=1, description="Training samples seen.")
    flops: float | None = Field(None, gt=0, description="Training FLOPs (forward + backward, analytic model).")

    @model_validator(mode="after")
    def _exactly_one(self) -> BudgetSpec:
        given = [name for name in ("steps", "samples", "flops") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of steps, samples or flops, got {given or 'none'}")
        return self


class CheckpointSpec(Model):
    """Training-state checkpoints (torch.distributed.checkpoint) under the trial's output folder."""

    every_steps: int | None = Field(
        None, ge=1, description="Optimizer steps between periodic checkpoints; null writes none before the end."
    )
    final: bool = Field(True, description="Write a checkpoint after the last optimizer step.")
    keep: int = Field(
        1, ge=1, le=1000, description="Complete checkpoints kept per trial; older ones are deleted after a newer one."
    )
    resume: bool = Field(
        True, description="Resume a restarted trial from its latest complete checkpoint instead of step 0."
    )


class TrainingSpec(Model):
    """How each trial trains."""

    batch_size: int = Field(16, ge=1, le=65536, description="Global batch size in samples.")
    grad_accumulation: int = Field(1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step.")
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="Samples per process in one forward and backward pass. When set, the gradient accumulation is "
        "derived as batchSize / (data-parallel processes x microBatchSize), so the global batch stays batchSize while "
        "processes or batchSize vary; gradAccumulation must then stay 1.",
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    budget: BudgetSpec = Field(default_factory=lambda: BudgetSpec(steps=200))
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Compute precision (autocast for bf16/fp16).")
    attention_backend: Literal["auto", "flash", "efficient", "math"] = Field(
        "auto", description="Scaled-dot-product attention kernel."
    )
    activation_checkpointing: bool = Field(False, description="Recompute block activations in the backward pass.")
    activation_checkpoint_blocks: list[int] | None = Field(
        None, description="Indices of the blocks that activationCheckpointing recomputes; default all blocks."
    )
    seed: int = Field(0, ge=0, description="Seed for weights, data order and dataset subsets.")
    eval_every: int = Field(50, ge=1, description="Steps between validation-loss evaluations.")
    eval_batches: int = Field(8, ge=1, description="Validation batches per evaluation.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device; 'auto' takes CUDA when present.")
    num_threads: int | None = Field(None, ge=1, description="CPU threads per process; default all cores / processes.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Training-state checkpoints.")
    ladder_steps: list[int] | None = Field(
        None,
        description="Compute ladder: run lengths in optimizer steps, each shorter than the trial, at which a "
        "cool-down branch is trained and evaluated. For a length T the branch starts from the constant-rate run at "
        "step T - int(cooldownFraction x T), decays the learning rate as a run of T steps would, and is evaluated on "
        "the validation and test splits; the run then continues from the branch point. The branch steps add to the "
        "trial's FLOPs. Needs schedule.kind constant_cooldown; spec.design (kind compute_ladder) sets it.",
    )

    @model_validator(mode="after")
    def _ladder_needs_cooldown(self) -> TrainingSpec:
        steps = self.ladder_steps
        if not steps:
            return self
        if self.schedule.kind != "constant_cooldown":
            raise ValueError(
                f"ladderSteps needs schedule.kind constant_cooldown (the branches cool down from a constant learning "
                f"rate), got schedule.kind {self.schedule.kind!r}"
            )
        if any(step < 1 for step in steps) or sorted(set(steps)) != list(steps):
            raise ValueError(f"ladderSteps must be positive and strictly increasing, got {steps}")
        if self.schedule.cooldown_fraction <= 0:
            raise ValueError("ladderSteps needs schedule.cooldownFraction above 0, or the branches have no cool-down")
        return self


class DistributedSpec(Model):
    """Process layout of one trial."""

    nodes: int = Field(1, ge=1, le=4096, description="Nodes (torchrun --nnodes; PyTorchJob Master + Workers).")
    procs_per_node: int = Field(1, ge=1, le=64, description="Processes per node, one per GPU on GPU nodes.")
    strategy: Literal["ddp", "fsdp", "pipeline"] = Field("ddp", description="Parallelism across processes.")
    microbatches: int = Field(4, ge=1, description="Pipeline micro-batches per step (strategy 'pipeline').")
    pipeline_schedule: Literal["gpipe", "1f1b"] = Field("gpipe", description="Pipeline schedule.")
    reshard_after_forward: bool = Field(
        True,
        description="FSDP: free the gathered parameters after the forward pass and gather them again for the backward "
        "pass (less memory, more communication).",
    )

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def data_parallel_size(self) -> int:
        """Processes that split each batch: all of them under ddp and fsdp, one pipeline under 'pipeline'."""
        return 1 if self.strategy == "pipeline" else self.world_size


class TrialConfig(Model):
    """Everything one trial needs: the spec's base settings with the axis values applied."""

    data: DataSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)

    @property
    def accumulation_steps(self) -> int:
        """Forward and backward passes per optimizer step: gradAccumulation, or derived from microBatchSize."""
        micro = self.training.micro_batch_size
        if micro is None:
            return self.training.grad_accumulation
        return max(1, self.training.batch_size // (self.distributed.data_parallel_size * micro))

    @model_validator(mode="after")
    def _batch_divides(self) -> TrialConfig:
        training, layout = self.training, self.distributed
        if training.micro_batch_size is not None:
            per_pass = layout.data_parallel_size * training.micro_batch_size
            if training.grad_accumulation != 1:
                raise ValueError(
                    f"training.gradAccumulation ({training.grad_accumulation}) must stay 1 when "
                    f"training.microBatchSize ({training.micro_batch_size}) is set, because the accumulation is "
                    "derived from it; remove one of the two"
                )
            if training.batch_size % per_pass != 0:
                raise ValueError(
                    f"training.batchSize ({training.batch_size}) must be divisible by data-parallel processes x "
                    f"microBatchSize ({layout.data_parallel_size} x {training.micro_batch_size} = {per_pass})"
                )
        per_step = layout.data_parallel_size * self.accumulation_steps
        if layout.strategy != "pipeline" and training.batch_size % per_step != 0:
            raise ValueError(
                f"training.batchSize ({training.batch_size}) must be divisible by processes x gradAccumulation "
                f"({layout.world_size} x {self.accumulation_steps} = {per_step})"
            )
        if layout.strategy == "pipeline":
            per_step = self.accumulation_steps * layout.microbatches
            if training.batch_size % per_step != 0:
                raise ValueError(
                    f"training.batchSize ({training.batch_size}) must be divisible by gradAccumulation x "
                    f"distributed.microbatches ({self.accumulation_steps} x {layout.microbatches} = {per_step}) "
                    "under the pipeline strategy"
                )
        return self

    @model_validator(mode="after")
    def _pipeline_fits(self) -> TrialConfig:
        layout = self.distributed
        if layout.strategy != "pipeline":
            return self
        stages = layout.world_size
        if self.model.depth < stages:
            raise ValueError(
                f"the pipeline strategy puts at least one block on each of its {stages} stages (one per process), "
                f"but model.depth is {self.model.depth}; use fewer processes or more blocks"
            )
        # torch.distributed.pipelining's 1F1B schedule needs a micro-batch in flight on every stage.
        if layout.pipeline_schedule == "1f1b" and layout.microbatches < stages:
            raise ValueError(
                f"distributed.microbatches ({layout.microbatches}) must be at least the number of pipeline stages "
                f"({stages}, one per process) under the 1f1b schedule; raise microbatches or use pipelineSchedule: gpipe"
            )
        return self

    @model_validator(mode="after")
    def _checkpoint_blocks_exist(self) -> TrialConfig:
        blocks = self.training.activation_checkpoint_blocks
        if blocks is None:
            return self
        outside = sorted({index for index in blocks if not 0 <= index < self.model.depth})
        if outside:
            raise ValueError(
                f"training.activationCheckpointBlocks {outside} name no block of the {self.model.depth} blocks "
                f"(valid indices 0..{self.model.depth - 1})"
            )
        return self


# Axes ------------------------------------------------------------------------

AxisPoint = dict[str, Any]


class Axis(Model):
    """One varied dimension of the study.

    Three forms:
      - `field` + `values`: one field, e.g. {field: model.embedDim, values: [64, 128]}.
      - `fields` + `factors`: several fields scaled together from their base values,
        e.g. {name: size, fields: [model.depth, model.heads], factors: [1, 2, 4]}.
      - `values` as mappings: linked settings, e.g. values: [{model.depth: 2, model.heads: 2}, ...].
    Field paths are dotted camelCase paths into a trial config (data, model, training, distributed).
    """

    name: str | None = Field(None, description="Axis name in reports; defaults to the field path.")
    field: str | None = Field(None, description="Dotted path of the varied field, e.g. model.embedDim.")
    fields: list[str] | None = Field(None, description="Fields scaled together by `factors`.")
    factors: list[float] | None = Field(None, description="Multipliers applied to the base values of `fields`.")
    values: list[Any] | None = Field(None, description="Values of `field`, or mappings of field path to value.")

    @model_validator(mode="after")
    def _one_form(self) -> Axis:
        if self.fields is not None or self.factors is not None:
            if not self.fields or not self.factors or self.field is not None or self.values is not None:
                raise ValueError("a scaled axis takes `fields` and `factors` (both non-empty) and no `field`/`values`")
        elif self.field is not None:
            if not self.values:
                raise ValueError(f"axis {self.field!r} needs a non-empty `values` list")
        elif not self.values or not all(isinstance(v, dict) and v for v in self.values):
            raise ValueError(
                "an axis needs `field` and `values`, `fields` and `factors`, "
                "or `values` given as mappings of field path to value"
            )
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.field:
            return self.field
        if self.fields:
            return "+".join(self.fields)
        return "+".join(sorted(self.values[0]))

    def __len__(self) -> int:
        return len(self.factors if self.factors is not None else self.values)


# Compute-optimal designs --------------------------------------------------------


class DesignSpec(Model):
    """A compute-optimal design: trials on IsoFLOP profiles instead of a grid.

    For each compute budget the planner picks `sizesPerBudget` consecutive model shapes of
    `sizes` (ordered by parameter count), centred on the size that `tokensPerParameter`
    predicts to be optimal, and sets each trial's training samples so that its FLOPs
    (wxscale's analytic model) match the budget within `tolerance`.
      - isoflop: one trial per (budget, size).
      - compute_ladder: one trial per size, trained to its largest budget at a constant
        learning rate, with a cool-down branch evaluated at each smaller budget.
    """

    kind: Literal["isoflop", "compute_ladder"] = Field(
        "isoflop", description="isoflop: one trial per budget and size. compute_ladder: one trial per size."
    )
    budgets: list[Annotated[float, Field(gt=0)]] = Field(
        min_length=1, description="Training compute budgets in FLOPs (forward + backward, analytic model), ascending."
    )
    sizes: Axis = Field(
        description="The family of model shapes, as an axis: e.g. {name: size, fields: [model.depth, model.embedDim], "
        "factors: [1, 2, 3]} or values given as mappings of field path to value. At least 3 shapes."
    )
    sizes_per_budget: int | None = Field(
        None, ge=3, description="Shapes trained at each budget (at least 3 for a parabola); default all of them."
    )
    tokens_per_parameter: float = Field(
        20.0,
        gt=0,
        description="Expected training tokens (patches seen) per non-embedding parameter at the optimum; it centres "
        "the shapes picked at each budget. 20 is Hoffmann et al. 2022's estimate for language models.",
    )
    tolerance: float = Field(
        0.01, gt=0, lt=0.5, description="Largest relative difference between a trial's training FLOPs and its budget."
    )

    @model_validator(mode="after")
    def _consistent(self) -> DesignSpec:
        if any(later <= earlier for earlier, later in zip(self.budgets, self.budgets[1:])):
            raise ValueError(f"budgets must be strictly ascending, got {self.budgets}")
        if len(self.sizes) < 3:
            raise ValueError(f"sizes needs at least 3 shapes to fit a parabola at each budget, got {len(self.sizes)}")
        if self.sizes_per_budget is not None and self.sizes_per_budget > len(self.sizes):
            raise ValueError(
                f"sizesPerBudget ({self.sizes_per_budget}) is larger than the number of shapes in sizes "
                f"({len(self.sizes)}); lower it or add shapes"
            )
        return self


class ComputeBudgetSpec(Model):
    """A cap on the compute of the whole study; the planner rejects a study whose trials exceed it."""

    max_flops: float | None = Field(
        None, gt=0, description="Total training FLOPs of all trials (analytic model, cool-down branches included)."
    )
    max_gpu_hours: float | None = Field(
        None, gt=0, description="Total GPU-hours of all trials, estimated as planned FLOPs / flopsPerGpuSecond / 3600."
    )
    flops_per_gpu_second: float | None = Field(
        None,
        gt=0,
        description="Sustained training FLOP/s of one GPU (e.g. 40 % of its peak), used to estimate GPU-hours; "
        "required with maxGpuHours.",
    )

    @model_validator(mode="after")
    def _one_cap(self) -> ComputeBudgetSpec:
        if self.max_flops is None and self.max_gpu_hours is None:
            raise ValueError("give maxFlops, maxGpuHours or both")
        if self.max_gpu_hours is not None and self.flops_per_gpu_second is None:
            raise ValueError("maxGpuHours needs flopsPerGpuSecond to turn planned FLOPs into GPU-hours")
        return self


# Cluster ---------------------------------------------------------------------


class WorkerResources(Model):
    """Resources of each PyTorchJob replica."""

    gpus: int = Field(0, ge=0, le=64, description="nvidia.com/gpu per replica; 0 runs on CPU.")
    cpu: str = Field("2", description="CPU request and limit, Kubernetes quantity.")
    memory: str = Field("8Gi", description="Memory request and limit, Kubernetes quantity.")


class Toleration(Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class SecretRef(Model):
    """A Secret in the study's namespace holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."""

    name: str = Field(description="Secret name.")


class ClusterSpec(Model):
    """Settings used only when the operator runs the study on Kubernetes."""

    image: str = Field("ghcr.io/wxscale/wxscale:0.1.0", description="Trainer container image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent")
    resources: WorkerResources = Field(default_factory=WorkerResources)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    priority_class_name: str | None = None
    service_account_name: str | None = None
    credentials_secret: SecretRef | None = Field(
        None, description="Secret with S3 credentials, injected into trainers as environment variables."
    )
    job_kind: Literal["PyTorchJob"] = Field(
        "PyTorchJob", description="Kubeflow job kind; only PyTorchJob (training-operator v1) for now."
    )
    backoff_limit: int = Field(2, ge=0, description="Pod restarts per job before it fails.")
    ttl_seconds_after_finished: int = Field(86400, ge=0, description="Job TTL after it finishes.")
    metrics_port: int = Field(9400, ge=1024, le=65535, description="Trainer Prometheus port.")


class StudySpec(Model):
    """The `spec` of a ScalingStudy."""

    data: DataSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    axes: list[Axis] = Field(default_factory=list, description="Axes whose grid product gives the trials.")
    points: list[AxisPoint] | None = Field(
        None, description="Explicit trials as mappings of field path to value; replaces the grid product of `axes`."
    )
    design: DesignSpec | None = Field(
        None, description="Compute-optimal design (IsoFLOP profiles or a compute ladder); replaces `axes` and `points`."
    )
    compute_budget: ComputeBudgetSpec | None = Field(
        None, description="Cap on the planned compute of the whole study (FLOPs or estimated GPU-hours)."
    )
    max_concurrent_trials: int = Field(1, ge=1, le=10000, description="Trials running at once.")
    max_failed_trials: int = Field(0, ge=0, description="Failed trials tolerated before the study fails.")
    max_retries: int = Field(1, ge=0, le=10, description="Retries of a failing trial before it counts as failed.")
    output: str | None = Field(None, description="Result location, a path or s3:// URL; the CLI's --output wins.")
    suspend: bool = Field(False, description="Stop starting trials and suspend running ones.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)

    @model_validator(mode="after")
    def _design_alone(self) -> StudySpec:
        if self.design is None:
            return self
        if self.axes or self.points is not None:
            raise ValueError("design replaces axes and points; remove `axes` and `points` or remove `design`")
        if self.design.kind == "compute_ladder":
            if self.training.schedule.kind != "constant_cooldown":
                raise ValueError(
                    "design.kind compute_ladder needs training.schedule.kind constant_cooldown (each branch cools "
                    f"down from a constant learning rate), got {self.training.schedule.kind!r}"
                )
            if self.distributed.strategy != "ddp":
                # NOTE: the branches copy the model and optimizer state whole, which is only checked under ddp.
                raise ValueError(
                    f"design.kind compute_ladder runs under distributed.strategy ddp only, got "
                    f"{self.distributed.strategy!r}; use kind isoflop for fsdp and pipeline trials"
                )
        return self


class Metadata(Model):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    # Fields the API server adds; accepted so a `kubectl get -o yaml` round-trips.
    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)


class ScalingStudy(Model):
    """A whole study document."""

    api_version: Literal["wxscale.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["ScalingStudy"] = KIND
    metadata: Metadata
    spec: StudySpec
    status: dict[str, Any] | None = Field(None, description="Written by wxscale; ignored on input.")


FieldPath = Annotated[str, Field(pattern=r"^(data|model|training|distributed)\.[A-Za-z0-9_.]+$")]
