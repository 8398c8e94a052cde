"""The computation of one forward kernel as a networkx graph of stages.

Each stage is one template macro (``templates/triton/stages/<name>.py.jinja``). Stages name the values they read,
write and update; the graph holds true dependencies (write -> read), ordering of updates (write -> update) and
anti-dependencies (read -> later update of the same value). A stage is active only when the spec needs it (no
rotation for a real state, no gate without z, ...). The emission order inside each phase is a topological order
that issues loads as early as the dependencies allow (memory latency hides behind the arithmetic that follows).
The graph is validated after it is built and after it is pruned; `mamba3-gen check --graph` prints it.

One stage list serves three kernels (``VARIANTS``): the fused forward (one program per sequence, head and P block
walks every chunk with the state in registers) and the two kernels of the chunk-parallel forward: ``states``
(sequential over chunks, its grid splits the state into P x N tiles; it stores the state entering each chunk, its Θ
and carried tokens) and ``out`` (one program per chunk, head and P block: the chunk's output from the stored
entering state). A stage names the variants it belongs to; each variant's graph is built, validated and ordered
the same way.

Complex specs have one more kernel, the rotation pre-pass ``prep`` (grid: sequence, head, pair block; sequential
over chunks like the fused kernel, carrying Θ): it writes Q̂ and K̂ per head, biased and rotated, and the final Θ.
The other three kernels then take Q̂, K̂ in place of Q, K (constexpr ``PREPPED``) and skip the stages marked
``prepass`` (the angle cumsum, the rotation and the final Θ), so their chunk loop carries no angle work.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import networkx as nx

from mamba3_gen.lower.lowering import Lowered
from mamba3_gen.signature import features, presence
from mamba3_gen.spec.model import Spec

PHASES = ("prologue", "chunk", "epilogue")
VARIANTS = ("fused", "states", "out", "prep")
PREPASS_VARIANTS = ("prep",)  # complex states only
_ALL = ("fused", "states", "out")
_FUSED_STATES = ("fused", "states")
_FUSED_OUT = ("fused", "out")


@dataclass(frozen=True)
class Stage:
    name: str
    phase: str
    doc: str
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    updates: tuple[str, ...] = ()
    optional_reads: tuple[str, ...] = ()  # read only when an active stage writes them (Θ_t of a complex state)
    loads: tuple[str, ...] = ()  # tensors read from memory
    loads_when: Callable | None = None  # (spec, lowered) -> bool: whether `loads` happen (else the stage loads none)
    stores: tuple[str, ...] = ()  # tensors written to memory
    when: Callable[[Spec, Lowered], bool] = lambda spec, low: True
    variants: tuple[str, ...] = _ALL  # the kernels this stage is part of
    prepass: bool = False  # done by the prep kernel when the others run with PREPPED (skipped there)
    guard: str | None = None  # a constexpr of the kernel that switches the stage on (a compile-time `if`)


def _complex(spec, low):
    return spec.is_complex


def _mimo(spec, low):
    return spec.dims.mimo_rank > 1


# Declaration order is the semantic order of writes to a value; the graph may reorder independent stages.
def _lags(spec, low):
    return low.lags > 0


STAGES: tuple[Stage, ...] = (
    Stage("init_theta", "prologue", "Θ carried across chunks: zeros, or the initial Θ", writes=("theta",),
          loads=("init_angle",), when=_complex, variants=_FUSED_STATES + ("prep",)),
    Stage("init_carry", "prologue", "carried H and the last J tokens' (k̂, v): zeros, or the initial states",
          writes=("h", "prev"), loads=("init_ssm", "init_k", "init_v", "mimo_v"), variants=_FUSED_STATES),
    Stage("fold_init", "prologue", "the first step on the initial state: its decay and the carried tokens' lag terms",
          reads=("prev",), updates=("h",), loads=("dt", "adt", "trap"),
          when=lambda spec, low: spec.options.initial_states, variants=_FUSED_STATES),
    Stage("load_chunk_state", "prologue", "the state entering the chunk (after its first step), its Θ and the "
          "carried tokens, as the states kernel stored them", writes=("theta", "h", "prev"),
          loads=("chunk_ssm", "chunk_angle", "chunk_k", "chunk_v", "mimo_v"), variants=("out",)),
    Stage("load_steps", "chunk", "the rule's prologue (a, c_j) at each token t + s, s = 0..J, and at the chunk's "
          "first J steps", writes=("dt", "a", "cw", "cm"), loads=("dt", "adt", "trap")),
    Stage("load_dt", "chunk", "Δ of the chunk's tokens", writes=("dt",), loads=("dt",), variants=PREPASS_VARIANTS),
    Stage("load_qk", "chunk", "Q and K rows (time-major, rank-minor) plus per-head biases, split in two halves "
          "(with PREPPED: the pre-pass's Q̂, K̂)", writes=("q", "k"), loads=("q", "k", "q_bias", "k_bias"),
          variants=_ALL + ("prep",)),
    Stage("load_v", "chunk", "V rows, times MIMO_V per rank", writes=("v_rows",), loads=("v", "mimo_v")),
    Stage("load_gate", "chunk", "Z rows, times MIMO_Z per rank", writes=("z_rows",), loads=("z", "mimo_z"),
          when=lambda spec, low: spec.options.z_gate, variants=_FUSED_OUT),
    # before angle_cumsum, state_update and carry_update move Θ, H and the carried tokens past the chunk
    # the fused kernel stores them too when the backward will read them (STORE_CHUNKS: no states re-run there)
    Stage("store_chunk_state", "chunk", "store the state entering the chunk (after its first step), its Θ and the "
          "carried tokens, for the out kernel or the backward", reads=("h", "prev"), optional_reads=("theta",),
          stores=("chunk_ssm", "chunk_angle", "chunk_k", "chunk_v"), variants=_FUSED_STATES, guard="STORE_CHUNKS"),
    Stage("decay_weights", "chunk", "cumsum of a, key scale, band weights, weights into the chunk-end state and "
          "of the carried tokens", reads=("a", "cw", "cm"), writes=("cs", "weights")),
    Stage("angle_cumsum", "chunk", "Θ_t = Θ + cumsum(Δ·π·tanh(angle)) in fp32; cos, sin per row",
          reads=("dt",), updates=("theta",), writes=("cos", "sin", "theta_t"), loads=("angles",), when=_complex,
          variants=_ALL + ("prep",), prepass=True),
    Stage("rotate", "chunk", "rotate Q and K by Θ_t (pairwise or halved layout)",
          reads=("cos", "sin"), updates=("q", "k"), when=_complex, variants=_ALL + ("prep",), prepass=True),
    Stage("store_qk_hat", "chunk", "store Q̂ and K̂ (biased, rotated) per head for the PREPPED kernels",
          reads=("q", "k"), stores=("q_hat", "k_hat"), variants=("prep",)),
    Stage("intra_chunk", "chunk", "(Q Kᵀ ⊙ W) V: W = decay·key scale once all lags landed, band weights before",
          reads=("q", "k", "v_rows", "cs", "weights"), writes=("y",), variants=_FUSED_OUT),
    Stage("inter_chunk", "chunk", "y += exp(cs)·Q Hᵀ, the state entering the chunk (taken after its first step)",
          reads=("q", "h", "cs"), updates=("y",), variants=_FUSED_OUT),
    Stage("prev_tokens", "chunk", "y += the carried tokens' lagged terms that land after step c0 (J ≥ 2)",
          reads=("q", "prev", "weights"), updates=("y",), when=lambda spec, low: low.lags > 1, variants=_FUSED_OUT),
    Stage("skip", "chunk", "y += D·v", reads=("v_rows",), updates=("y",), loads=("D",),
          when=lambda spec, low: spec.options.d_skip, variants=_FUSED_OUT),
    Stage("gate", "chunk", "y ⊙= silu(z)", reads=("z_rows",), updates=("y",), when=lambda spec, low: spec.options.z_gate,
          variants=_FUSED_OUT),
    Stage("reduce_ranks", "chunk", "out = Σ_r y_r ⊙ MIMO_Out_r (not with PER_RANK: mimo_o None)", reads=("y",),
          writes=("out",), loads=("mimo_o",), when=_mimo, variants=_FUSED_OUT),
    Stage("store_out", "chunk", "write the chunk's output (PER_RANK: y per rank, (B, L, R, H, P))",
          reads=("out", "y"), stores=("out",), when=_mimo, variants=_FUSED_OUT),
    Stage("store_y", "chunk", "write the chunk's output (one rank)", reads=("y",), stores=("out",),
          when=lambda spec, low: not _mimo(spec, low), variants=_FUSED_OUT),
    Stage("state_update", "chunk", "H = exp(cs_last + a_next)·H + (V ⊙ w_end)ᵀ K (+ the carried tokens' terms), "
          "taken after the next chunk's first step",
          reads=("k", "v_rows", "weights", "prev"), updates=("h",), variants=_FUSED_STATES),
    Stage("carry_update", "chunk", "the chunk's last J tokens (k̂ rotated by their Θ, raw v) become the carried ones",
          optional_reads=("theta", "theta_t"), updates=("prev",), loads=("k", "k_bias", "v"),
          when=lambda spec, low: low.lags > 1, variants=_FUSED_STATES),  # one lag: final_states reads it from memory
    Stage("final_theta", "epilogue", "store the final Θ", reads=("theta",), stores=("final_angle",),
          when=lambda spec, low: spec.is_complex and spec.options.final_states, variants=_FUSED_STATES + ("prep",),
          prepass=True),
    Stage("final_states", "epilogue", "store H and the last J tokens' k̂ and v",
          optional_reads=("theta",), reads=("h", "prev"), stores=("final_ssm", "final_k", "final_v"),
          loads=("k", "k_bias", "v"), loads_when=lambda spec, low: low.lags == 1,  # one lag: the last token from memory
          when=lambda spec, low: spec.options.final_states, variants=_FUSED_STATES),
)


class GraphError(AssertionError):
    pass


def spec_tensors(spec: Spec, low: Lowered, variant: str = "fused") -> frozenset[str]:
    """The tensors a spec's forward kernel actually takes (the op passes None for the others): a stage may name a
    tensor that only some specs have (init_carry loads the initial angle only for a complex state with initial
    states), so its loads and stores are filtered by this set before they are shown."""
    cplx = spec.is_complex
    present = {
        # the layer inputs, out and the initial/final state fields: from the signature table
        **presence(features(spec)._replace(lags=low.lags)),
        # the chunk-parallel forward's intermediates: the state entering each chunk, its Θ, the carried tokens
        # that land after a chunk's first step (J >= 2)
        # (the fused kernel's with STORE_CHUNKS, for the backward)
        "chunk_ssm": variant != "prep", "chunk_angle": variant != "prep" and cplx,
        "chunk_k": variant != "prep" and low.lags > 1,
        "chunk_v": variant != "prep" and low.lags > 1,
        # the rotation pre-pass's output: Q̂, K̂ per head (complex states)
        "q_hat": variant == "prep", "k_hat": variant == "prep",
    }
    return frozenset(name for name, used in present.items() if used)


@dataclass
class KernelPlan:
    """The validated, ordered stages of one kernel, and what it moves (``tensors``: the spec's, see
    :func:`spec_tensors`; None shows every tensor the stages name)."""

    graph: nx.DiGraph
    order: dict[str, list[Stage]] = field(default_factory=dict)
    tensors: frozenset[str] | None = None

    @property
    def stages(self) -> list[Stage]:
        return [s for p in PHASES for s in self.order[p]]

    def _moved(self, names) -> list[str]:
        return sorted({t for t in names if self.tensors is None or t in self.tensors})

    @property
    def loads(self) -> list[str]:
        """Tensors the kernel reads from memory (only those the spec has)."""
        return self._moved(t for s in self.stages for t in s.loads)

    @property
    def stores(self) -> list[str]:
        """Tensors the kernel writes (only those the spec has)."""
        return self._moved(t for s in self.stages for t in s.stores)

    def describe(self) -> str:
        lines = []
        for phase in PHASES:
            lines.append(f"{phase}:")
            for s in self.order[phase]:
                deps = sorted(self.graph.predecessors(s.name))
                moved = [f"{what} {', '.join(names)}" for what, names in
                         (("loads", self._moved(s.loads)), ("stores", self._moved(s.stores))) if names]
                lines.append(f"  {s.name:<16} <- {', '.join(deps) or '-':<40} {s.doc}"
                             + (f" [{'; '.join(moved)}]" if moved else ""))
        lines.append(f"loads:  {', '.join(self.loads)}")
        lines.append(f"stores: {', '.join(self.stores)}")
        return "\n".join(lines)


def build_graph(stages: tuple[Stage, ...] | list[Stage]) -> nx.DiGraph:
    g = nx.DiGraph()
    for i, s in enumerate(stages):
        g.add_node(s.name, stage=s, index=i)
    writer: dict[str, str] = {}
    readers: dict[str, list[str]] = {}
    for s in stages:
        for v in s.reads + tuple(o for o in s.optional_reads if o in writer):
            if v not in writer:
                raise GraphError(f"stage {s.name} reads {v!r} before any stage writes it")
            g.add_edge(writer[v], s.name, value=v, kind="data")
            readers.setdefault(v, []).append(s.name)
        for v in s.updates:
            if v not in writer:
                raise GraphError(f"stage {s.name} updates {v!r} before any stage writes it")
            g.add_edge(writer[v], s.name, value=v, kind="data")
            for r in readers.get(v, []):
                if r != s.name:
                    g.add_edge(r, s.name, value=v, kind="anti")
            writer[v], readers[v] = s.name, []
        for v in s.writes:
            if v in writer:
                raise GraphError(f"{v!r} is written by both {writer[v]} and {s.name}; use 'updates'")
            writer[v], readers[v] = s.name, []
    return g


def validate(g: nx.DiGraph) -> None:
    if not nx.is_directed_acyclic_graph(g):
        raise GraphError(f"stage graph has a cycle: {nx.find_cycle(g)}")
    rank = {p: i for i, p in enumerate(PHASES)}
    for u, v in g.edges:
        pu, pv = g.nodes[u]["stage"].phase, g.nodes[v]["stage"].phase
        if rank[pu] > rank[pv]:
            raise GraphError(f"{v} ({pv}) depends on {u} ({pu}), a later phase")


for _s in STAGES:  # the kernel template wraps a guarded stage in `if GUARD:` in the chunk loop only
    if _s.guard and (_s.prepass or _s.phase != "chunk"):
        raise GraphError(f"stage {_s.name}: a guard is supported on non-prepass chunk stages only")


def plan_kernel(spec: Spec, lowered: Lowered, variant: str = "fused") -> KernelPlan:
    """The ordered stages of one kernel: ``variant`` is one of VARIANTS (the fused forward by default; the rotation
    pre-pass's, PREPASS_VARIANTS, exist for complex states only).

    Raises:
        ValueError: an unknown variant, or a pre-pass variant for a real state.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r}; one of {VARIANTS}")
    if variant in PREPASS_VARIANTS and not spec.is_complex:
        raise ValueError(f"spec {spec.name!r} has a real state: no rotation pre-pass")
    for v in VARIANTS:  # each variant's full graph is well formed for every spec
        validate(build_graph([s for s in STAGES if v in s.variants]))
    active = [s for s in STAGES if variant in s.variants and s.when(spec, lowered)]
    active = [replace(s, loads=()) if s.loads_when is not None and not s.loads_when(spec, lowered) else s
              for s in active]
    g = build_graph(active)
    validate(g)

    def priority(name: str):
        s = g.nodes[name]["stage"]
        return (0 if s.name.startswith("load_") else 1, g.nodes[name]["index"])

    order: dict[str, list[Stage]] = {p: [] for p in PHASES}
    for name in nx.lexicographical_topological_sort(g, key=priority):
        s = g.nodes[name]["stage"]
        order[s.phase].append(s)
    return KernelPlan(g, order, spec_tensors(spec, lowered, variant))
