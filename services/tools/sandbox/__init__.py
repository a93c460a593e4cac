"""A sandboxed, stateful Python kernel per trajectory (DeepEyesV2's code tool), pure Python, no Ray.

`pool.KernelPool` supervises the kernels (one per session, warm spares forked from a template
process); `kernel` is the process side (template, holder, kernel loop); `isolation` holds the
pieces each kernel applies to itself before user code runs (namespaces, uid, Landlock, seccomp,
rlimits).
"""
