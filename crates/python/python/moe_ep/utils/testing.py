"""Timing helpers of DeepEP-style tests (`deep_ep.utils.testing`'s names and meaning): CUDA
events around repeated calls, or kernel times from the torch profiler."""
import json
import os
import tempfile

import numpy as np
import torch
import torch.distributed as dist


def flush_l2_cache(enabled: bool = True):
    """Overwrites 256 MB so the next op starts with a cold L2 (as DeepEP's loop does)."""
    if enabled:
        torch.empty(int(256e6 // 4), dtype=torch.int, device="cuda").zero_()


def bench(fn, num_warmups: int = 50, num_tests: int = 50, post_fn=None, flush_l2: bool = True):
    """`(average, min, max)` seconds of `fn()` between CUDA events on the current stream,
    over `num_tests` calls after `num_warmups` (the first timed call is left out)."""
    torch.cuda.synchronize()
    for _ in range(num_warmups):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(num_tests)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(num_tests)]
    for i in range(num_tests):
        flush_l2_cache(flush_l2)
        starts[i].record()
        fn()
        ends[i].record()
        if post_fn is not None:
            post_fn()
    torch.cuda.synchronize()
    times = np.array([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])[1:]
    return np.average(times), np.min(times), np.max(times)


class suppress_stdout_stderr:  # noqa: N801 (DeepEP's name)
    """Silences this process's stdout and stderr (file descriptors 1 and 2) inside `with`."""

    def __enter__(self):
        self.saved = os.dup(1), os.dup(2)
        self.null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self.null, 1)
        os.dup2(self.null, 2)
        return self

    def __exit__(self, *_):
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in (*self.saved, self.null):
            os.close(fd)


def bench_kineto(fn, kernel_names, num_tests: int = 30, suppress_kineto_output: bool = False, trace_path=None,
                 flush_l2: bool = True, barrier_comm_profiling: bool = False, num_kernels_per_period: int = 1,
                 barrier=None):
    """Average GPU time (seconds) of the kernels whose names contain each of `kernel_names`,
    from the torch profiler over `num_tests` calls of `fn` (a list per name with
    `num_kernels_per_period` kernels of that name per call, e.g. send and receive halves)."""
    single = isinstance(kernel_names, str)
    names = (kernel_names,) if single else tuple(kernel_names)
    fn()
    torch.cuda.synchronize()
    dummy = torch.ones(1, dtype=torch.float, device="cuda")
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    with (suppress_stdout_stderr() if suppress_kineto_output else empty_suppress()):
        with profiler:
            for _ in range(num_tests):
                flush_l2_cache(flush_l2)
                if barrier_comm_profiling:
                    torch.cuda._sleep(int(2e7))
                    barrier() if barrier is not None else dist.all_reduce(dummy)
                fn()
            torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        profiler.export_chrome_trace(tmp.name)
        events = json.loads(open(tmp.name).read())["traceEvents"]
    if trace_path is not None:
        profiler.export_chrome_trace(trace_path)
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    out = []
    for name in names:
        durations = [e["dur"] / 1e6 for e in kernels if f"::{name}" in e["name"]]
        assert durations, f"no kernel named like ::{name} in the profile"
        assert len(durations) % num_kernels_per_period == 0
        n = len(durations) // num_kernels_per_period
        if num_kernels_per_period > 1:
            out.append([sum(durations[j::num_kernels_per_period]) / n for j in range(num_kernels_per_period)])
        else:
            out.append(sum(durations) / len(durations))
    return out[0] if single else out


class empty_suppress:  # noqa: N801 (DeepEP's name)
    """A `with` that does nothing (`suppress_stdout_stderr`'s stand-in)."""

    def __enter__(self):
        return self

    def __exit__(self, *_):
        pass
