"""What each schedule is: name, paper, semantics, constraints, and how to build its action order.

The names in :data:`SCHEDULE_NAMES` are the contract with the command line and the plan JSON. Each
:class:`ScheduleInfo` says whether the method is *synchronous* (every micro-batch of a step sees the
same weights and the update equals plain mini-batch SGD) or asynchronous (no flush; weights are
stale, and the text in ``async_semantics`` says how), and which ``(p, m, v)`` it accepts.
:meth:`ScheduleInfo.validate` raises a :class:`~planner.errors.SpecError` (a ``ValueError``) naming the
field, the value and the fix. What runs a schedule in the runtime (a ``torch.distributed.pipelining``
class or the planner's own program) is the one table in :mod:`planner.schedules.table`, read here
through :attr:`ScheduleInfo.runner`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from planner.errors import SpecError
from planner.schedules import bidirectional, orders, vshape
from planner.schedules.actions import Program
from planner.schedules.table import ScheduleRunner, runner

SCHEDULE_NAMES: tuple[str, ...] = (
    "gpipe",
    "1f1b",
    "interleaved-1f1b",
    "pipedream",
    "pipedream-2bw",
    "chimera",
    "zb-h1",
    "zb-h2",
    "zb-v",
    "dualpipe-v",
    "pipelined-backprop",
    "pipemare",
)


@dataclass(frozen=True, kw_only=True)
class ScheduleInfo:
    """Metadata of one pipeline schedule; ``build(p, m, v)`` returns its :class:`Program`.

    ``chunks_per_device`` is the ``v`` the method needs (``None``: any ``v >= min_v``).
    ``update_every`` is how many micro-batches feed one optimizer update: ``m`` for the synchronous
    methods and PipeDream-2BW/PipeMare (one update per step), 1 for PipeDream and Pipelined Backprop
    (one update per micro-batch). ``extra_param_buffers`` counts parameter-sized buffers beyond the
    weight versions that the method itself adds (PipeMare's discrepancy-correction velocity).
    ``build(p, m, v)`` writes the action order; for asynchronous schedules ``m`` there counts every
    simulated micro-batch (several optimizer steps), see :func:`build_program`.
    """

    name: str
    title: str
    paper: str
    url: str
    synchronous: bool
    splits_backward: bool
    chunks_per_device: int | None
    min_v: int
    description: str
    memory: str
    constraints: str
    async_semantics: str | None
    updates_per_microbatch: bool
    extra_param_buffers: int
    build: Callable[[int, int, int], Program]
    _min_microbatches: Callable[[int], int]
    _even_p: bool = False
    _m_multiple_of_p: bool = False

    def min_microbatches(self, p: int) -> int:
        """The smallest ``m`` the method accepts for ``p`` devices."""
        return self._min_microbatches(p)

    @property
    def runner(self) -> ScheduleRunner | None:
        """How the runtime executes this schedule (:mod:`planner.schedules.table`); ``None``: it does not."""
        return runner(self.name)

    def torch_class_for(self, v: int) -> str | None:
        """The torch class with this schedule's order for ``v`` chunks per device (GPipe with ``v > 1``:
        Looped BFS), from :mod:`planner.schedules.table`; ``None`` when torch has none."""
        row = self.runner
        return row.torch_class_for(v) if row is not None else None

    @property
    def torch_class(self) -> str | None:
        """:meth:`torch_class_for` the smallest ``v`` this schedule runs."""
        return self.torch_class_for(self.chunks_per_device or self.min_v)

    def validate(self, p: int, m: int, v: int = 1) -> None:
        """Raise ``SpecError`` (a ``ValueError``) with the field, value and fix if ``(p, m, v)`` is invalid."""
        where = f"schedule {self.name!r}"
        _positive_int("p", p, "p is the number of pipeline devices (stages); use p >= 1")
        _positive_int("m", m, "m is the number of micro-batches per optimizer step; use m >= 1")
        _positive_int("v", v, "v is the number of model chunks per device; use v >= 1")
        if self.chunks_per_device is not None and v != self.chunks_per_device:
            raise SpecError(
                "v",
                v,
                f"{where} runs exactly {self.chunks_per_device} chunk(s) per device; set v={self.chunks_per_device}"
                + (" or pick 'interleaved-1f1b' for v > 1" if self.chunks_per_device == 1 else ""),
            )
        if v < self.min_v:
            raise SpecError("v", v, f"{where} needs v >= {self.min_v}; for v=1 use '1f1b'")
        if self._even_p and p % 2:
            raise SpecError("p", p, f"{where} pairs device d with device p-1-d; use an even p (e.g. {p + 1})")
        need = self.min_microbatches(p)
        if m < need:
            raise SpecError("m", m, f"{where} needs m >= {need} for p={p}; raise m to {need} or more")
        if self._m_multiple_of_p and m % p:
            fix = (m // p + 1) * p
            raise SpecError("m", m, f"{where} needs m to be a multiple of p={p}; use m={fix}")


def _positive_int(field_name: str, value: object, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(field_name, value, f"expected a positive integer; {fix}")


@lru_cache(maxsize=256)
def build_program(name: str, p: int, m: int, v: int) -> Program:
    """The (immutable) program of ``name`` for ``(p, m, v)``, cached: some orders take a list-scheduling
    pass to derive. ``m`` counts every simulated micro-batch (several steps for asynchronous schedules).
    """
    return _REGISTRY[name].build(p, m, v)


def get_schedule(name: str) -> ScheduleInfo:
    """The :class:`ScheduleInfo` called ``name``; a bad name raises ``ValueError`` with a suggestion."""
    info = _REGISTRY.get(name) if isinstance(name, str) else None
    if info is None:
        close = difflib.get_close_matches(str(name).lower(), SCHEDULE_NAMES, n=1, cutoff=0.0)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise SpecError("schedule", name, f"unknown schedule; {hint}valid names: {', '.join(SCHEDULE_NAMES)}")
    return info


_ZB = "Qi, Wan, Huang, Lin. Zero Bubble Pipeline Parallelism. ICLR 2024"
_ZB_URL = "https://arxiv.org/abs/2401.10241"
_2BW = (
    "Narayanan, Phanishayee, Shi, Chen, Zaharia. Memory-Efficient Pipeline-Parallel DNN Training. ICML 2021"
)
_2BW_URL = "https://arxiv.org/abs/2006.09503"

_ENTRIES = (
    ScheduleInfo(
        name="gpipe",
        title="GPipe (Looped BFS for v > 1)",
        paper="Huang et al. GPipe: Efficient Training of Giant Neural Networks using Pipeline Parallelism. "
        "NeurIPS 2019. Looped BFS: Lamy-Poirier. Breadth-First Pipeline Parallelism. MLSys 2023",
        url="https://arxiv.org/abs/1811.06965",
        synchronous=True,
        splits_backward=False,
        chunks_per_device=None,
        min_v=1,
        description="All m forwards, then all m backwards, then a flush and one optimizer step. With v > 1 "
        "chunks per device, chunk by chunk (breadth first), as torch's ScheduleLoopedBFS.",
        memory="Every device holds the activations of all m micro-batches at the end of the forwards.",
        constraints="any p, m, v >= 1",
        async_semantics=None,
        updates_per_microbatch=False,
        extra_param_buffers=0,
        build=orders.gpipe,
        _min_microbatches=lambda p: 1,
    ),
    ScheduleInfo(
        name="1f1b",
        title="1F1B (PipeDream-Flush, DAPPLE, Megatron-LM)",
        paper=_2BW + " (PipeDream-Flush); Fan et al. DAPPLE, PPoPP 2021",
        url=_2BW_URL,
        synchronous=True,
        splits_backward=False,
        chunks_per_device=1,
        min_v=1,
        description="Device d runs p-1-d warm-up forwards, then alternates one forward and one backward, "
        "then drains; a flush and one optimizer step end the step. Same bubble as GPipe, less memory.",
        memory="Device d holds at most min(p - d, m) micro-batches: p on the first device instead of m.",
        constraints="v = 1; any p, m",
        async_semantics=None,
        updates_per_microbatch=False,
        extra_param_buffers=0,
        build=lambda p, m, v: orders.pipedream_flush(p, m),
        _min_microbatches=lambda p: 1,
    ),
    ScheduleInfo(
        name="interleaved-1f1b",
        title="Interleaved 1F1B (Megatron-LM virtual pipeline)",
        paper="Narayanan et al. Efficient Large-Scale Language Model Training on GPU Clusters Using "
        "Megatron-LM. SC 2021",
        url="https://arxiv.org/abs/2104.04473",
        synchronous=True,
        splits_backward=False,
        chunks_per_device=None,
        min_v=2,
        description="Each device holds v model chunks (stage k on device k mod p). Micro-batches go in "
        "groups of p through chunk 0, then chunk 1, ...; the bubble shrinks by v at the cost of v times "
        "more point-to-point messages.",
        memory="Device d holds min(2(p-1-d) + (v-1)p + 1, mv) chunks of 1/v stage: device 0 holds "
        "p + (p-1)/v micro-batches, a little more than 1F1B's p.",
        constraints="v >= 2; m a multiple of p (Megatron's rule)",
        async_semantics=None,
        updates_per_microbatch=False,
        extra_param_buffers=0,
        build=orders.interleaved,
        _min_microbatches=lambda p: p,
        _m_multiple_of_p=True,
    ),
    ScheduleInfo(
        name="pipedream",
        title="PipeDream (weight stashing, asynchronous 1F1B)",
        paper="Narayanan et al. PipeDream: Generalized Pipeline Parallelism for DNN Training. SOSP 2019",
        url="https://arxiv.org/abs/1806.03377",
        synchronous=False,
        splits_backward=False,
        chunks_per_device=1,
        min_v=1,
        description="1F1B that never flushes: every device updates its weights after every backward. "
        "Step time here is the steady-state time of m micro-batches.",
        memory="Device d stashes one weight version per in-flight micro-batch: p - d versions and p - d "
        "micro-batches of activations.",
        constraints="v = 1; any p, m",
        async_semantics="Weight stashing: a micro-batch's backward on a stage uses the weight version its "
        "forward used there, so each stage computes a valid gradient, but of stale weights: on device d the "
        "forward sees weights missing the last p-1-d updates (one update per micro-batch). Different stages "
        "use different versions for the same micro-batch unless vertical sync is on (every stage uses the "
        "version stage 0 used, staleness p-1 everywhere); we model the default, without vertical sync.",
        updates_per_microbatch=True,
        extra_param_buffers=0,
        build=lambda p, m, v: orders.pipedream_async(p, m),
        _min_microbatches=lambda p: 1,
    ),
    ScheduleInfo(
        name="pipedream-2bw",
        title="PipeDream-2BW (double-buffered weights)",
        paper=_2BW,
        url=_2BW_URL,
        synchronous=False,
        splits_backward=False,
        chunks_per_device=1,
        min_v=1,
        description="Asynchronous 1F1B without flushes; gradients are accumulated over m micro-batches and "
        "a new weight version is made once per step. Step time here is the steady-state time of m "
        "micro-batches.",
        memory="Two weight versions per device; device d holds p - d micro-batches of activations.",
        constraints="v = 1; m >= p so that two versions suffice",
        async_semantics="2 weight versions, gradient accumulation over the m micro-batches of a step and an "
        "update delayed by one step: W(t+1) = W(t) - lr * grad f(W(t-1)). Every stage sees weights exactly "
        "1 update stale; the gradient is consistent within a micro-batch (its forward and backward use the "
        "same version).",
        updates_per_microbatch=False,
        extra_param_buffers=0,
        build=lambda p, m, v: orders.pipedream_async(p, m),
        _min_microbatches=lambda p: p,
    ),
    ScheduleInfo(
        name="chimera",
        title="Chimera (bidirectional pipelines)",
        paper="Li, Hoefler. Chimera: Efficiently Training Large-Scale Neural Networks with Bidirectional "
        "Pipelines. SC 2021",
        url="https://arxiv.org/abs/2107.06925",
        synchronous=True,
        splits_backward=False,
        chunks_per_device=1,
        min_v=1,
        description="Two replicas of the p-stage model run pipelines in opposite directions (device d holds "
        "stage d of one and stage p-1-d of the other); half of each unit of p micro-batches goes each way "
        "and fills the other pipeline's bubbles. The replicas all-reduce gradients before a synchronous "
        "update.",
        memory="Two stages of weights per device (weight_versions = 2 counts the second replica). Device d "
        "holds p/2 + 1 + min(d, p-1-d) micro-batches for m = p (p/2 + 1 at the ends, p in the middle) and p on "
        "every device once m >= 2p.",
        constraints="p even; m a multiple of p",
        async_semantics=None,
        updates_per_microbatch=False,
        extra_param_buffers=0,
        build=lambda p, m, v: bidirectional.chimera(p, m),
        _min_microbatches=lambda p: p,
        _even_p=True,
        _m_multiple_of_p=True,
    ),
    ScheduleInfo(
        name="zb-h1",
        title="ZB-H1 (zero bubble, 1F1B memory)",
        paper=_ZB,
        url=_ZB_URL,
        synchronous=True,
        splits_backward=True,
        chunks_per_device=1,
        min_v=1,
        description="1F1B with the backward split into I (input gradient, on the critical path) and W "
        "(weight gradient, postponed): device d delays its first d W passes, I passes move earlier and the W "
        "fill the drain. torch's ScheduleInterleavedZeroBubble implements its v-chunk generalisation (ZB1P).",
        memory="Every device holds at most min(p, m) micro-batches (counted until W): 1F1B's peak.",
        constraints="v = 1; any p, m",
        async_semantics=None,
        updates_per_microbatch=False,
        extra_param_buffers=0,
        build=lambda p, m, v: orders.zb_h1(p, m),
        _min_microbatches=lambda p: 1,
    ),
    ScheduleInfo(
        name="zb-h2",
        title="ZB-H2 (zero bubble, 2p-1 micro-batches in flight)",
        paper=_ZB,
        url=_ZB_URL,
        synchronous=True,
        splits_backward=True,
        chunks_per_device=1,
        min_v=1,
        description="Extra warm-up forwards fill the bubble before the first I, and postponed W fill the "
        "tail, so with equal F, I, W each device works without a gap from its first to its last action. "
        "Zero bubble needs the next step to start per device without a global sync (the paper's optimizer "
        "post-validation): see overlapped_step_time_s.",
        memory="Up to min(2p - 1, m) micro-batches in flight on every device: about twice 1F1B.",
        constraints="v = 1; any p, m (the parallelogram needs m >= 2p - 1)",
        async_semantics=None,
        updates_per_microbatch=False,
        extra_param_buffers=0,
        build=lambda p, m, v: orders.zb_h2(p, m),
        _min_microbatches=lambda p: 1,
    ),
    ScheduleInfo(
        name="zb-v",
        title="ZB-V (zero bubble, V-shaped, 2 chunks per device)",
        paper=_ZB + ", section 6",
        url=_ZB_URL,
        synchronous=True,
        splits_backward=True,
        chunks_per_device=2,
        min_v=2,
        description="Two chunks per device placed in a V (device d holds stages d and 2p-1-d), steady "
        "pattern F0 I0 W0 F1 I1 W1, W postponed in the drain. Zero bubble with equal F, I, W when steps "
        "overlap per device, at 1F1B's activation memory.",
        memory="Device d holds min(p, m, (m+d+1)/2) micro-batches (chunks count 1/2): p once m >= 2p-1, like "
        "1F1B's first device, but on every device.",
        constraints="v = 2; any p, m",
        async_semantics=None,
        updates_per_microbatch=False,
        extra_param_buffers=0,
        build=lambda p, m, v: vshape.zb_v(p, m),
        _min_microbatches=lambda p: 1,
    ),
    ScheduleInfo(
        name="dualpipe-v",
        title="DualPipe-V (DeepSeek, V-shaped DualPipe)",
        paper="DeepSeek-AI. DeepSeek-V3 Technical Report, section 3.2.1 (DualPipe), 2024; DualPipeV: the "
        "'cut-in-half' variant in github.com/deepseek-ai/DualPipe",
        url="https://arxiv.org/abs/2412.19437",
        synchronous=True,
        splits_backward=True,
        chunks_per_device=2,
        min_v=2,
        description="DualPipe folded onto one model copy: V placement, steady phase of paired "
        "forward-of-one-chunk + full-backward-of-the-other (DeepSeek overlaps the pair's compute with its "
        "all-to-all; we model the pair back to back), zero-bubble I/W splits in warm-up and drain only.",
        memory="One weight copy (DualPipe needs two); every device holds p + 1/2 micro-batches (chunks count "
        "1/2).",
        constraints="v = 2; m >= 2p",
        async_semantics=None,
        updates_per_microbatch=False,
        extra_param_buffers=0,
        build=lambda p, m, v: vshape.dualpipe_v(p, m),
        _min_microbatches=lambda p: 2 * p,
    ),
    ScheduleInfo(
        name="pipelined-backprop",
        title="Pipelined Backpropagation (fine-grained, asynchronous)",
        paper="Kosson, Chiley, Venigalla, Hestness, Koster. Pipelined Backpropagation at Scale: Training "
        "Large Models without Batches. MLSys 2021",
        url="https://arxiv.org/abs/2003.11666",
        synchronous=False,
        splits_backward=False,
        chunks_per_device=1,
        min_v=1,
        description="Every tick each stage runs one forward and one backward and updates its weights after "
        "every backward (batch size one per update), with no flush and no weight stashing. Step time here "
        "is the steady-state time of m micro-batches.",
        memory="One weight version; device d holds 2(p-1-d) + 1 micro-batches of activations.",
        constraints="v = 1; any p, m",
        async_semantics="No weight stashing: the forward of a micro-batch on device d uses weights missing "
        "the last 2(p-1-d) updates (the gradient delay), and its backward uses weights 2(p-1-d) updates "
        "newer than its forward (weight inconsistency). The paper mitigates both with Spike Compensation "
        "and Linear Weight Prediction, which scale with that delay.",
        updates_per_microbatch=True,
        extra_param_buffers=0,
        build=lambda p, m, v: orders.pipelined_backprop(p, m),
        _min_microbatches=lambda p: 1,
    ),
    ScheduleInfo(
        name="pipemare",
        title="PipeMare (asynchronous, learning-rate warm-up + discrepancy correction)",
        paper="Yang, Zhang, Li, Re, Aberger, De Sa. PipeMare: Asynchronous Pipeline Parallel DNN Training. "
        "MLSys 2021",
        url="https://arxiv.org/abs/1910.05124",
        synchronous=False,
        splits_backward=False,
        chunks_per_device=1,
        min_v=1,
        description="Pipelined Backprop's bubble-free pipeline with one update per step of m micro-batches "
        "and no weight stashing. Step time here is the steady-state time of m micro-batches.",
        memory="One weight version plus one parameter-sized velocity buffer for discrepancy correction; "
        "device d holds 2(p-1-d) + 1 micro-batches of activations.",
        constraints="v = 1; any p, m",
        async_semantics="Forward weights on device d lag by about ceil(2(p-1-d)/m) updates and the backward "
        "uses newer weights than the forward. Learning-rate rescheduling: a per-stage warm-up whose step "
        "size starts inversely proportional to the stage's delay and ramps to the base rate, since early "
        "training is most sensitive to delay. Discrepancy correction: the backward uses weights "
        "extrapolated back by the delay along an exponential moving average of recent weight updates (the "
        "velocity buffer), approximating the forward weights without stashing them. The warm-up length and "
        "the average's decay are hyper-parameters of the optimizer; the timeline does not depend on them.",
        updates_per_microbatch=False,
        extra_param_buffers=1,
        build=lambda p, m, v: orders.pipelined_backprop(p, m),
        _min_microbatches=lambda p: 1,
    ),
)

_REGISTRY: dict[str, ScheduleInfo] = {info.name: info for info in _ENTRIES}
assert tuple(_REGISTRY) == SCHEDULE_NAMES
