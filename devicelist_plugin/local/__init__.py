"""Local users' devices and keys: the host API
(:class:`~devicelist_plugin.local.handler.LocalDeviceHandler`) and the JSON
served from them to other servers (:mod:`.serving`)."""

from devicelist_plugin.local.handler import (
    ChangeListener,
    CpuRunner,
    LocalDeviceHandler,
    run_inline,
    thread_pool_runner,
)

__all__ = ["ChangeListener", "CpuRunner", "LocalDeviceHandler", "run_inline", "thread_pool_runner"]
