"""Device limits as data: what a target GPU can launch. The build refuses kernels that would not fit."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    arch: str  # "sm_90a", ... ; "interpreter" runs on the CPU through TRITON_INTERPRET=1
    capability: int  # e.g. 90
    smem_per_block: int  # bytes a block may opt into
    min_dot_k: int  # smallest K of a tensor-core dot
    regs_per_thread: int = 255

    @property
    def is_gpu(self) -> bool:
        return self.arch != "interpreter"


TARGETS: dict[str, Target] = {
    "sm_90a": Target("H100 / H200 (Hopper)", "sm_90a", 90, 232448, 16),
    "sm_80": Target("A100 (Ampere)", "sm_80", 80, 166912, 16),
    "sm_86": Target("RTX 30xx / A10 / A40 (Ampere consumer)", "sm_86", 86, 101376, 16),
    "sm_89": Target("RTX 4090 / L40 (Ada)", "sm_89", 89, 101376, 16),
    "sm_120": Target("RTX 50xx / RTX PRO 6000 (Blackwell consumer)", "sm_120", 120, 101376, 16),
    "interpreter": Target("Triton interpreter (CPU)", "interpreter", 0, 1 << 30, 1),
}
DEFAULT_TARGET = "sm_90a"


def arch_help() -> str:
    """The targets as the CLI's --arch help lists them: every name of TARGETS, which is what mamba3_gen.load(arch=...)
    and the CLI accept (a GPU without a target of its own gets one of these limits, see cache.gpu_arch)."""
    gpus = [n for n, t in TARGETS.items() if t.is_gpu]
    return ", ".join(gpus) + ", or interpreter (CPU)"


def get_target(arch: str) -> Target:
    try:
        return TARGETS[arch]
    except KeyError:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(TARGETS)}") from None
