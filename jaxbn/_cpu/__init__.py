"""The CPU path of `jaxbn.ops.batch_norm`: its passes as fused C++ kernels, called through XLA's
FFI. One job per module, each importing only those below it:

    path.py       when a call can use the kernels, and its fused and pooled calls (for `ops`)
    calls.py      the kernels as JAX functions, checked, with the twins' derivatives
    primitive.py  the `jaxbn.kernel` primitive: C++ or twin, decided when it is lowered
    twins.py      the kernels' pure-JAX twins
    library.py    the kernels usable in this process, once: build, load, register, status
    build.py      compiling them into the cache: the compiler, the key, the lock, the timeout
    cache.py      what in the cache may be loaded: ownership, digest, the verified open file

`jaxbn.kernels` is the public face of calls.py and twins.py.
"""
