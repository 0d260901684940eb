"""Inductor's CUDA code for a function, generated on a machine without a GPU.

``torch.compile`` decides on the host what a CUDA device will run: which ops fuse into which
Triton kernels, which go to cuBLAS/cuDNN (``extern_kernels``), and how many bytes each
generated kernel moves (inductor's own count, ``kernel_num_gb``). Only compiling the kernels
and launching them needs the device. Here the function is traced on fake CUDA tensors
(``FakeTensorMode``), lowered by inductor for a stated device (an H200 unless told otherwise),
and stopped once the wrapper code exists, before anything is compiled or loaded.

What it needs: torch and triton (a CPU build of torch with the ``triton`` wheel beside it is
enough; the GPU machine's CUDA build as well). A function called without autograd goes to
inductor's inner compiler as an inference graph, without the joint-graph pattern passes that
``torch.compile`` runs first; an output keeps the layout inductor chooses where eager's might
differ.

A function called with autograd (``training_launches``) is a forward and a backward graph, as
AOTAutograd splits it. Autograd on CUDA tensors needs a driver (it asks the device for its
current stream), so the split is made on the CPU: the forward is traced on the fake device
(autocast's casts as CUDA's autocast makes them), moved to the CPU as an aten graph, and given
to AOTAutograd there with inductor's own partitioner (its joint-graph passes, then the min-cut
that chooses what the backward keeps and what it recomputes); both parts are then moved back
and generated for the device, the backward's saved inputs in the layouts the forward produces
them. What a CUDA build would decide differently while partitioning (a joint pass that only
applies on CUDA, such as padding a matmul, which would time the choice on the device) is not
seen.

  with FakeCuda() as cuda:
      launches = cuda.compiled_launches(fn, args, autocast=torch.bfloat16)
      baseline = cuda.eager_launches(fn, args, autocast=torch.bfloat16)
      forward, backward = cuda.training_launches(fn, args, torch.bfloat16, requires_grad=[True, ...])
"""

from __future__ import annotations

import contextlib
import os
import re
import types
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

H200 = types.SimpleNamespace(  # what inductor reads of a device (torch.cuda.get_device_properties)
    name="NVIDIA H200", major=9, minor=0, multi_processor_count=132, regs_per_multiprocessor=65536,
    max_threads_per_multi_processor=2048, max_threads_per_block=1024, warp_size=32, total_memory=141 * 2**30,
    L2_cache_size=60 * 2**20, shared_memory_per_block_optin=232448, gcnArchName="", uuid="fake")

MATMULS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward", "_convolution", "cudnn_convolution",
           "linear", "matmul", "conv2d")


def available() -> Optional[str]:
    """None where code can be generated here, else why not (one line)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install -c constraints.txt triton)"
    return None


@dataclass
class Launch:
    """One kernel launch of generated code: a Triton kernel with the bytes it moves, or an
    extern kernel (cuBLAS, cuDNN, an aten fallback) by name."""
    name: str
    triton: bool
    gb: float = 0.0
    counted: bool = True  # a Triton kernel whose code carries its byte count (kernel_num_gb)


@dataclass
class Launches:
    launches: List[Launch] = field(default_factory=list)

    @property
    def kernels(self) -> int:
        return len(self.launches)

    @property
    def triton(self) -> int:
        return sum(k.triton for k in self.launches)

    @property
    def uncounted(self) -> int:
        """Triton launches whose bytes inductor did not write into their code (torch 2.11's
        combined kernels): counted as none in ``gb``."""
        return sum(not k.counted for k in self.launches)

    @property
    def extern(self) -> List[str]:
        return [k.name for k in self.launches if not k.triton]

    @property
    def gb(self) -> float:
        """Bytes the generated (Triton) kernels move; a Triton matmul template's included."""
        return sum(k.gb for k in self.launches if k.triton)

    @property
    def extern_gb(self) -> float:
        """Bytes the extern kernels (cuBLAS matmuls, cuDNN convolutions, aten fallbacks) read and
        write: their inputs and outputs once, inductor's own count (``get_read_write_buffers_sizes``)."""
        return sum(k.gb for k in self.launches if not k.triton)


class _Stop(Exception):
    """Raised once the wrapper code exists: nothing is compiled or loaded."""


def _in_chain(e: BaseException, kind: type) -> bool:
    while e is not None:
        if isinstance(e, kind):
            return True
        e = e.__cause__ or e.__context__
    return False


def parse_launches(code: str, extern_gb: Optional[dict] = None) -> Launches:
    """The launches of inductor's wrapper code, in order: each ``<triton kernel>.run(`` and each
    ``extern_kernels.<op>(`` or aten fallback in the wrapper's ``call`` (``extern_gb``: an extern
    kernel's GB by the buffer it writes)."""
    start = code.rindex("def call(")  # the wrapper's (each kernel's source ends with a harness of its own)
    end = code.find("def benchmark_compiled_module", start)
    call = code[start:end if end > 0 else len(code)]
    gb = {m.group(1): float(m.group(3)) for m in re.finditer(
        r"async_compile\.triton\('(\w+)'((?:(?!async_compile\.triton\().)*?)'kernel_num_gb': ([0-9.e+-]+)",
        code, re.S)}
    out = Launches()
    for m in re.finditer(r"\b(triton_\w+)\.run\(|\b(extern_kernels\.\w+|torch\.ops\.aten\.[\w.]+)\(", call):
        if m.group(1):
            out.launches.append(Launch(m.group(1), True, gb.get(m.group(1), 0.0), m.group(1) in gb))
        else:
            line = call[call.rfind("\n", 0, m.start()) + 1:call.find("\n", m.end())]
            written = re.search(r"out=(?:reinterpret_tensor\()?(buf\d+)", line) or re.match(r"\s*(buf\d+) = ", line)
            out.launches.append(Launch(m.group(2).split(".")[-1] if m.group(2).startswith("extern") else m.group(2),
                                       False, (extern_gb or {}).get(written.group(1) if written else "", 0.0)))
    return out


@dataclass
class Binary:
    """A generated Triton kernel as Triton and ptxas compiled it for the device (each of its
    configurations that inductor's autotuner would time there), and what ptxas gave it."""
    name: str
    registers: List[int] = field(default_factory=list)  # per thread, per configuration
    local_bytes: List[int] = field(default_factory=list)  # local memory per thread (spills, stack arrays)
    error: Optional[str] = None

    @property
    def spills(self) -> bool:
        """Local memory in every configuration: whichever the autotuner keeps is slowed by it."""
        return bool(self.local_bytes) and min(self.local_bytes) > 0


_TRITON_SOURCE = re.compile(r"async_compile\.triton\('(\w+)', '''(.*?)''', device_str='cuda'\)", re.S)
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")


def kernel_sources(code: str) -> List[Tuple[str, str]]:
    """(name, source) of each Triton kernel in inductor's wrapper code."""
    return _TRITON_SOURCE.findall(code)


def _cubin(result) -> Optional[bytes]:
    kernel = getattr(result, "kernel", None)
    raw = getattr(kernel, "cubin_raw", None)
    if raw is None:
        raw = (getattr(kernel, "asm", None) or {}).get("cubin")
    if raw is None and getattr(kernel, "cubin_path", None):
        with open(kernel.cubin_path, "rb") as f:
            raw = f.read()
    return raw


def _resources(cubin: bytes) -> Tuple[int, int]:
    """(registers, local bytes) of a cubin's kernel, as the CUDA toolkit's cuobjdump reads them."""
    import shutil
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        raise RuntimeError("no cuobjdump: neither in the triton wheel nor on PATH")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = _RESOURCES.search(out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage: no resource line in {out[-300:]!r}")
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


def compile_kernels(sources: Sequence[Tuple[str, str]]) -> List[Binary]:
    """Each Triton kernel (``kernel_sources`` of wrapper code generated here) compiled for the
    device it was generated for (the architecture in the kernel's metadata: sm_90 for the H200)
    by Triton's compiler and the ptxas its wheel carries, as inductor compiles them on the GPU
    before their first launch; no driver and no GPU needed. What a CPU can check of the
    generated code: that it compiles, and the registers and local memory ptxas gives it (spills
    make a kernel slow); not that it computes the right values."""
    from torch._inductor.codecache import PyCodeCache
    from torch._inductor.runtime import triton_helpers

    out = []
    with mock.patch.object(triton_helpers, "set_driver_to_gpu", lambda: None), \
            mock.patch.object(torch._C, "_cuda_getCurrentRawStream", lambda device: 0, create=True):
        for name, source in sources:
            binary = Binary(name)
            try:
                kernel = getattr(PyCodeCache.load(source), name)
                kernel.precompile(warm_cache_only=True)
                for result in kernel.compile_results:
                    cubin = _cubin(result)
                    if cubin is None:
                        raise RuntimeError("no cubin among the compile results")
                    regs, local = _resources(cubin)
                    binary.registers.append(regs)
                    binary.local_bytes.append(local)
            except Exception as e:  # noqa: BLE001  (reported per kernel: the caller counts failures)
                first = str(e).splitlines()[0][:300] if str(e) else ""
                binary.error = f"{type(e).__name__}: {first}"
            out.append(binary)
    return out


def _retarget(gm: torch.fx.GraphModule, device: str) -> torch.fx.GraphModule:
    """A copy of an aten graph whose ops make their tensors on ``device`` (no node metadata)."""
    graph, env = torch.fx.Graph(), {}
    move = lambda a: torch.device(device) if isinstance(a, torch.device) else a  # noqa: E731
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            raise ValueError(f"the graph holds a constant ({node.target}): it cannot be moved between devices")
        new = graph.node_copy(node, lambda n: env[n])
        new.args = torch.fx.node.map_aggregate(new.args, move)
        new.kwargs = torch.fx.node.map_aggregate(new.kwargs, move)
        new.meta = {}
        env[node] = new
    return torch.fx.GraphModule(gm, graph)


def _cpu_inputs(tensors: Sequence[torch.Tensor], requires_grad: Sequence[bool], mode=None) -> list:
    """Fake CPU tensors shaped, strided and typed as these, requiring grad where told (in
    ``mode``, or a fake mode of their own)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with mode or FakeTensorMode():
        return [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).requires_grad_(bool(g))
                for t, g in zip(tensors, requires_grad)]


def _static_stride(node) -> Optional[Tuple[int, ...]]:
    """An inductor graph output's strides as integers (None where it has none: a view of an
    input, a non-tensor)."""
    try:
        return tuple(int(s) for s in node.get_layout().stride)
    except Exception:  # noqa: BLE001
        return None


def _touched(t: torch.Tensor) -> int:
    """Bytes of a tensor's distinct elements (a broadcast dimension read once)."""
    n = t.element_size()
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride else 1
    return n


class _EagerCount(TorchDispatchMode):
    """Eager launches on the fake device: each op that does work (not views or metadata), with
    the bytes of its tensor inputs and outputs (matmuls and convolutions as extern launches, as
    on the compiled side)."""

    def __init__(self) -> None:
        super().__init__()
        self.out = Launches()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        launch = eager_launch(func, args, kwargs, out)
        if launch is not None:
            self.out.launches.append(launch)
        return out


def eager_launch(func, args, kwargs, out) -> Optional[Launch]:
    """The launch an eager op makes on a GPU, with the bytes of its tensor inputs and outputs;
    None for an op that launches nothing (a view, an allocation, a host read)."""
    name = func.overloadpacket.__name__
    results = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if func.is_view or not (results or func._schema.is_mutable) or name in (
            "empty", "empty_strided", "empty_like", "new_empty_strided", "_local_scalar_dense", "lift_fresh", "detach",
            "_unsafe_view"):  # (a view the schema does not mark as one: reshape's result after a copy)
        return None
    inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    moved = sum(_touched(t) for t in inputs) + sum(_touched(t) for t in results)
    return Launch(name, name.rstrip("_") not in MATMULS, moved / 1e9)


def _contiguous(self: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    """``Tensor.contiguous`` without its Python binding's device guard (which asks a driver)."""
    if self.is_contiguous(memory_format=memory_format):
        return self
    return torch.ops.aten.clone.default(self, memory_format=memory_format)


_GETITEM = torch.Tensor.__getitem__


def _getitem(self: torch.Tensor, index):
    """Basic indexing (ints, slices, None, ...) as view ops, without ``__getitem__``'s device guard;
    anything else as before."""
    idx = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i is Ellipsis or (isinstance(i, (int, slice)) and not isinstance(i, bool)) for i in idx):
        return _GETITEM(self, index)
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx = idx[:k] + (slice(None),) * (self.dim() - real) + idx[k + 1:]
    out, d = self, 0
    for i in idx:
        if i is None:
            out, d = torch.ops.aten.unsqueeze.default(out, d), d + 1
        elif isinstance(i, int):
            out = torch.ops.aten.select.int(out, d, i)
        else:
            start, stop, step = i.indices(out.shape[d])
            out, d = torch.ops.aten.slice.Tensor(out, d, start, stop, step), d + 1
    return out


def _clear_device_caches() -> None:
    """What torch caches about the device it runs on: ``has_triton`` and its kin, inductor's
    device queries and properties, dynamo's worker copy of them."""
    import torch.utils._triton as triton_utils
    from torch._inductor.runtime.hints import DeviceProperties

    from torch._dynamo import device_interface
    from torch._inductor import utils as inductor_utils

    for module in (triton_utils, inductor_utils):
        for fn in vars(module).values():
            if callable(fn) and hasattr(fn, "cache_clear"):
                fn.cache_clear()
    DeviceProperties.create.cache_clear()
    device_interface.caching_worker_device_properties.pop("cuda", None)


def _first_template(select):
    """inductor's choice between a matmul's implementations, made without timing them on a
    device: its first Triton template where it has one, else cuBLAS's (a choice of one is not
    timed)."""
    def choose(self, name, choices, *args, **kwargs):
        from torch._inductor.select_algorithm import ExternKernelCaller, TritonTemplateCaller

        # (not a subgraph choice such as decompose-k's split matmul, nor cuBLAS)
        templates = [c for c in choices if isinstance(c, TritonTemplateCaller)]
        externs = [c for c in choices if isinstance(c, ExternKernelCaller)]
        return select(self, name, templates[:1] or externs[:1] or choices[:1], *args, **kwargs)
    return choose


_CONV_MEMORY_FORMAT = torch._C._conv_determine_backend_memory_format


def _suggests_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _conv_memory_format(input_: torch.Tensor, weight: torch.Tensor, backend) -> torch.memory_format:
    """cuDNN's layout for a convolution on the (fake) CUDA device: channels-last where the input
    or the weight is (``cudnn_conv_suggest_memory_format``), as a CUDA build decides it; a CPU
    build would pick a non-cuDNN backend and NCHW."""
    if input_.device.type != "cuda":
        return _CONV_MEMORY_FORMAT(input_, weight, backend)
    if _suggests_channels_last(input_) or _suggests_channels_last(weight):
        return torch.channels_last
    return torch.contiguous_format


class FakeCuda(contextlib.AbstractContextManager):
    """Within: a CUDA device that exists for tracing and inductor's code generation only."""

    def __init__(self, props=H200, matmul_templates: bool = False) -> None:
        """``matmul_templates``: every matmul inductor can generate as a Triton template is
        generated so (its pointwise neighbours fused into it as prologue and epilogue), as if
        max-autotune had timed each template faster than cuBLAS on the device; the template's
        first configuration is taken, which changes its speed, not its launches or bytes."""
        self.props = props
        self.matmul_templates = matmul_templates
        self._stack = contextlib.ExitStack()
        self.mode = None
        self._codes: List[str] = []
        self._extern_gb: dict = {}  # a wrapper's code -> its extern kernels' GB by written buffer
        self._out_strides: dict = {}  # a wrapper's code -> the strides inductor chose for its outputs

    def __enter__(self) -> "FakeCuda":
        from torch._dynamo import device_interface
        from torch._inductor import config as inductor_config
        from torch._inductor import graph as inductor_graph
        from torch._subclasses import fake_tensor
        import torch.utils._triton as triton_utils
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        props, s = self.props, self._stack
        backend = make_backend(GPUTarget("cuda", props.major * 10 + props.minor, props.warp_size))
        zeros = lambda *a, **k: torch.zeros(16, dtype=torch.uint8)  # noqa: E731
        patches = [
            (torch.cuda, "is_available", lambda: True), (torch.cuda, "device_count", lambda: 1),
            (torch.cuda, "current_device", lambda: 0), (torch.cuda, "is_initialized", lambda: True),
            (torch.cuda, "_lazy_init", lambda: None), (torch.cuda, "set_device", lambda *a, **k: None),
            (torch.cuda, "get_device_properties", lambda *a, **k: props),
            (torch.cuda, "get_device_capability", lambda *a, **k: (props.major, props.minor)),
            (torch.cuda, "get_rng_state", zeros), (torch.cuda, "set_rng_state", lambda *a, **k: None),
            (torch.cuda.random, "get_rng_state", zeros), (torch.cuda.random, "set_rng_state", lambda *a, **k: None),
            (torch.cuda, "_exchange_device", lambda idx: 0), (torch.cuda, "_maybe_exchange_device", lambda idx: 0),
            (torch.accelerator, "is_available", lambda: False),  # dynamo's stream tracking stays off
            (fake_tensor, "init_gpu_context", lambda device: None),
            (triton_utils, "triton_backend", lambda: backend),
            (triton_utils, "triton_hash_with_backend", lambda: f"fake-{props.name}"),
            (inductor_graph.GraphLowering, "_compile_to_module", lambda graph: self._capture(graph)),
            (torch.Tensor, "contiguous", _contiguous), (torch.Tensor, "__getitem__", _getitem),
            (torch._C, "_conv_determine_backend_memory_format", _conv_memory_format),
        ]
        for name, value in (("get_compute_capability", lambda device=None: props.major * 10 + props.minor),
                            ("get_device_properties", lambda device=None: props),
                            ("is_available", lambda: True), ("current_device", lambda: 0),
                            ("device_count", lambda: 1)):
            patches.append((device_interface.CudaInterface, name, staticmethod(value)))
        for obj, name, value in patches:
            s.enter_context(mock.patch.object(obj, name, value))
        # inductor turns a fallback for an op that has a decomposition into an error where CI is
        # set (a check for PyTorch's own CI); a real compile here falls back as it would anywhere
        s.enter_context(mock.patch.dict(os.environ))
        os.environ.pop("CI", None)
        s.enter_context(inductor_config.patch(benchmark_kernel=True, fx_graph_cache=False, compile_threads=1))
        if self.matmul_templates:
            from torch._inductor import select_algorithm

            s.enter_context(inductor_config.patch(max_autotune_gemm=True, max_autotune_gemm_backends="ATEN,TRITON"))
            s.enter_context(mock.patch.object(select_algorithm.AlgorithmSelectorCache, "__call__",
                                              _first_template(select_algorithm.AlgorithmSelectorCache.__call__)))
        _clear_device_caches()  # answers cached before (no GPU, no triton) would hold within
        s.callback(_clear_device_caches)  # and the fake device's answers would hold after
        self.mode = fake_tensor.FakeTensorMode()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self.mode = None

    def _capture(self, graph) -> None:
        from torch._inductor.scheduler import ExternKernelSchedulerNode
        from torch._inductor.virtualized import V

        code = graph.codegen()[0].value
        with V.set_graph_handler(graph):
            self._extern_gb[code] = {buf.get_name(): n.get_read_write_buffers_sizes() / 1e9
                                     for n in graph.scheduler.nodes if isinstance(n, ExternKernelSchedulerNode)
                                     for buf in n.get_outputs()}
            self._out_strides[code] = [_static_stride(o) for o in graph.graph_outputs]
        self._codes.append(code)
        raise _Stop()

    def launches(self, code: str) -> Launches:
        """The launches of wrapper code generated here, extern kernels' bytes included (each
        extern kernel of inductor's schedule found at a launch, or an error)."""
        out = parse_launches(code, self._extern_gb.get(code))
        scheduled = sum(self._extern_gb.get(code, {}).values())
        if abs(out.extern_gb - scheduled) > 1e-9 + 1e-6 * scheduled:
            raise RuntimeError(f"extern kernels' bytes: {out.extern_gb:.6f} GB found at launches, {scheduled:.6f} GB "
                               "in inductor's schedule: a launch line parse_launches does not read")
        return out

    def tensor(self, shape: Sequence[int], dtype: torch.dtype, stride: Optional[Sequence[int]] = None) -> torch.Tensor:
        """A fake CUDA tensor of this shape, dtype and strides."""
        with self.mode:
            if stride is None:
                return torch.empty(tuple(shape), dtype=dtype, device="cuda")
            return torch.empty_strided(tuple(shape), tuple(stride), dtype=dtype, device="cuda")

    def _traced(self, fn: Callable, args: Sequence, autocast: Optional[torch.dtype], decompose: bool = True):
        """fn's aten graph (with inductor's decompositions where ``decompose``) over its tensor
        arguments, those inside tuples included (graph inputs, as dynamo makes them); the others
        fixed."""
        from torch._inductor.decomposition import select_decomp_table
        from torch.fx.experimental.proxy_tensor import make_fx

        leaves, spec = torch.utils._pytree.tree_flatten(list(args))  # tensors inside tuples too
        where = [i for i, a in enumerate(leaves) if isinstance(a, torch.Tensor)]

        def over_tensors(*tensors):
            full = list(leaves)
            for i, t in zip(where, tensors):
                full[i] = t
            with torch.autocast("cuda", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                out = fn(*torch.utils._pytree.tree_unflatten(full, spec))
            return tuple(torch.utils._pytree.tree_leaves(out))

        tensors = [leaves[i] for i in where]
        with self.mode:
            return make_fx(over_tensors, decomposition_table=select_decomp_table() if decompose else {})(*tensors), tensors

    def code(self, fn: Callable, args: Sequence, autocast: Optional[torch.dtype] = None,
             options: Optional[dict] = None) -> str:
        """Inductor's wrapper code for fn(*args) on the device (args: fake CUDA tensors and
        constants), under these inductor options (``torch.compile``'s ``options``)."""
        gm, tensors = self._traced(fn, args, autocast)
        with torch.no_grad():
            return self._generate(gm, tensors, options, is_inference=True)  # as a no-grad torch.compile's

    def _generate(self, gm, inputs: Sequence, options: Optional[dict], visible: Optional[int] = None, **kind) -> str:
        """Inductor's wrapper code for an aten graph over fake device inputs (``kind``: the inner
        compiler's is_inference / is_backward). As ``compile_fx`` does before the inner compiler,
        the graph's first ``visible`` outputs (all where None) are marked user-visible: they keep
        the strides eager gives them; the others (what a training forward saves for its
        backward) take the layouts inductor prefers."""
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx_inner, record_original_output_strides

        out = gm.graph.find_nodes(op="output")[0]
        outs = out.args[0] if not isinstance(out.args[0], torch.fx.Node) else out.args
        out.meta["user_visible_output_idxs"] = [i for i in range(len(outs) if visible is None else visible)
                                                if isinstance(outs[i], torch.fx.Node)]
        record_original_output_strides(gm)
        n = len(self._codes)
        with self.mode, inductor_config.patch(**(options or {})):
            try:
                compile_fx_inner(gm, list(inputs), **kind)
            except Exception as e:  # noqa: BLE001  (the capture stops the compilation by raising)
                if not _in_chain(e, _Stop):
                    raise
        if len(self._codes) == n:  # nothing to generate (the graph only returns its inputs or views)
            return "def call(args):\n    pass\n"
        return self._codes[n]

    def _on_device(self, gm, inputs: Sequence, strides: Optional[dict] = None):
        """A CPU graph of AOTAutograd's traced again on the fake device, over inputs of the same
        shapes (``strides``: a placeholder's layout by name, where the device's differs)."""
        from torch.fx.experimental.proxy_tensor import make_fx

        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        like = [self.tensor(t.shape, t.dtype, (strides or {}).get(name, t.stride())) if isinstance(t, torch.Tensor)
                else t for name, t in zip(names, inputs)]
        with self.mode:
            return make_fx(_retarget(gm, "cuda"))(*like), like

    def _split(self, fn: Callable, args: Sequence, autocast: Optional[torch.dtype], options: Optional[dict],
               requires_grad: Sequence[bool]):
        """AOTAutograd's forward and backward graphs of fn(*args) (CPU graphs and their example
        inputs), split by inductor's partitioner."""
        from torch._functorch import config as functorch_config
        from torch._functorch.aot_autograd import aot_module_simplified
        from torch._inductor import config as inductor_config
        from torch._inductor import decomposition as inductor_decomposition
        from torch._inductor.compile_fx import partition_fn
        from torch._inductor.decomposition import select_decomp_table
        from functorch.compile import make_boxed_func

        gm, tensors = self._traced(fn, args, autocast, decompose=False)  # autograd formulas for aten ops
        cpu_gm = _retarget(gm, "cpu")
        inputs = _cpu_inputs(tensors, requires_grad)
        parts = {}

        def keep(kind):
            def compiler(graph, example_inputs):
                parts[kind] = (graph, list(example_inputs))
                return make_boxed_func(graph)
            return compiler

        if not hasattr(functorch_config, "force_non_lazy_backward_lowering"):
            raise RuntimeError(f"torch {torch.__version__} compiles a backward graph only when it runs: training "
                               "graphs need a torch whose functorch config has force_non_lazy_backward_lowering")
        # inductor decomposes some ops for a GPU only (a convolution's bias gradient as a sum of its
        # own): decomposed here, on the CPU, as for the device
        gpu = mock.patch.object(inductor_decomposition, "is_gpu", lambda device: True)
        with functorch_config.patch(force_non_lazy_backward_lowering=True), inductor_config.patch(**(options or {})), gpu:
            aot_module_simplified(cpu_gm, inputs, fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                                  partition_fn=partition_fn, decompositions=select_decomp_table())
        return parts["forward"], parts.get("backward")  # no backward: nothing to differentiate

    def training_codes(self, fn: Callable, args: Sequence, autocast: Optional[torch.dtype] = None,
                       options: Optional[dict] = None, requires_grad: Sequence[bool] = ()) -> Tuple[str, str]:
        """Inductor's wrapper code for fn(*args) as ``torch.compile`` compiles it under autograd:
        the forward (which also writes what the backward keeps) and the backward.
        ``requires_grad``: for each tensor argument, in order (those inside tuples included)."""
        (fw, fw_in), backward = self._split(fn, args, autocast, options, requires_grad)
        fw_dev, fw_dev_in = self._on_device(fw, fw_in)
        outs = list(fw.graph.output_node().args[0])
        if backward is None:  # (an output that is an input, or no input that requires grad reaches one)
            return self._generate(fw_dev, fw_dev_in, options), "def call(args):\n    pass\n"
        bw, bw_in = backward
        # AOTAutograd's forward returns the user's outputs, then what the backward keeps (each a
        # backward placeholder of the same name, beside the tangents)
        saved = {n.name for n in bw.graph.nodes if n.op == "placeholder"} & {o.name for o in outs
                                                                              if isinstance(o, torch.fx.Node)}
        forward = self._generate(fw_dev, fw_dev_in, options, visible=len(outs) - len(saved))
        # the backward's saved inputs in the layouts inductor wrote them in (AOTAutograd restrides
        # the backward's placeholders to the compiled forward's outputs likewise)
        strides = {o.name: st for o, st in zip(outs, self._out_strides.get(forward, []))
                   if isinstance(o, torch.fx.Node) and st is not None}
        bw_dev, bw_dev_in = self._on_device(bw, bw_in, strides)
        return forward, self._generate(bw_dev, bw_dev_in, options, is_backward=True)

    def training_launches(self, fn: Callable, args: Sequence, autocast: Optional[torch.dtype] = None,
                          options: Optional[dict] = None, requires_grad: Sequence[bool] = ()) -> Tuple[Launches, Launches]:
        forward, backward = self.training_codes(fn, args, autocast, options, requires_grad)
        return self.launches(forward), self.launches(backward)

    def eager_training_launches(self, fn: Callable, args: Sequence, autocast: Optional[torch.dtype] = None,
                                requires_grad: Sequence[bool] = ()) -> Tuple[Launches, Launches]:
        """What eager mode launches for fn(*args) and its backward, op by op: the forward on the
        device; the backward's autograd formulas run on the CPU over the forward's aten graph
        (autograd needs a driver on the device), the same ops a CUDA build dispatches."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        forward = self.eager_launches(fn, args, autocast)
        gm, tensors = self._traced(fn, args, autocast, decompose=False)
        cpu_gm = _retarget(gm, "cpu")
        counter = _EagerCount()
        mode = FakeTensorMode()
        inputs = _cpu_inputs(tensors, requires_grad, mode)
        with mode:
            outs = [o for o in cpu_gm(*inputs) if isinstance(o, torch.Tensor) and o.requires_grad]
            wanted = [t for t in inputs if t.requires_grad]
            tangents = [torch.empty_strided(o.shape, o.stride(), dtype=o.dtype) for o in outs]
            with counter:
                torch.autograd.grad(outs, wanted, tangents, allow_unused=True)
        return forward, counter.out

    def compiled_launches(self, fn: Callable, args: Sequence, autocast: Optional[torch.dtype] = None,
                          options: Optional[dict] = None) -> Launches:
        return self.launches(self.code(fn, args, autocast, options))

    def eager_launches(self, fn: Callable, args: Sequence, autocast: Optional[torch.dtype] = None) -> Launches:
        """What eager mode launches for fn(*args) on the device, op by op."""
        counter = _EagerCount()
        with self.mode, torch.no_grad(), torch.autocast("cuda", dtype=autocast or torch.bfloat16,
                                                         enabled=autocast is not None):
            with counter:
                fn(*args)
        return counter.out
