"""The table of titles: which kernel report gets which title, and where its function is found.

The facts are syzkaller's (pkg/report/linux.go, the formats syzbot titles its reports with):
the report headers, the title each shape of header gets, the lines the guilty frame is looked
for on (``parts``: the RIP line, the call trace, lockdep's ``at:`` lines, ...), the frames of
the reporting machinery that are never guilty (SKIP) and the two extractors for stalls and hung
tasks, whose top frame is a random victim. Titles name the function ``{f}``; ``{0}``, ``{1}``
are the groups of the header (or of the wider ``report`` pattern). Pure data: no Twisted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

#: A part that takes the frames of a stack trace (syzkaller's parseStackTrace).
STACK = None

_MACROS = (
    ("{{ADDR}}", "0x[0-9a-f]+"),
    ("{{PC}}", r"\[<?(?:0x)?[0-9a-f]+>?\]"),
    ("{{FUNC}}", r"([a-zA-Z0-9_]+)(?:\.|\+)"),
    ("{{SRC}}", r"([a-zA-Z0-9-_/.]+\.[a-z]+:[0-9]+)"),
    ("{{TASK}}", r"[\s\S]{0,100}?"),
)


def _c(pattern: str) -> re.Pattern:
    for macro, regex in _MACROS:
        pattern = pattern.replace(macro, regex)
    return re.compile(pattern)


@dataclass(frozen=True, slots=True)
class TitleFormat:
    """One shape of report: its header pattern, the title, where its function is found."""

    title: re.Pattern
    text: str
    report: re.Pattern | None = None
    #: Parts matched in order to find the guilty frame (None: the title names no frame).
    stack: tuple | None = None
    #: Tried when `stack` finds no frame.
    stack2: tuple | None = None
    #: More frames that are never guilty in this kind of report.
    skip: tuple[str, ...] = ()
    #: Picks the guilty frame among the candidates' names: (index, -1 for none; a name to
    #: give it instead of its own, or None).
    extractor: Callable[[list[str]], tuple[int, str | None]] | None = None
    #: The group of `report` (or `title`) that names the guilty function, when not a stack.
    frame_group: int | None = None


def _f(title, text, **kw) -> TitleFormat:
    for key in ("report",):
        if kw.get(key) is not None:
            kw[key] = _c(kw[key])
    for key in ("stack", "stack2"):
        if kw.get(key) is not None:
            kw[key] = tuple(p if p is STACK else _c(p) for p in kw[key])
    if "skip" in kw:
        kw["skip"] = tuple(kw["skip"])
    return TitleFormat(_c(title), text, **kw)


RIP = (
    r"(?:IP|NIP|pc |PC is at):? (?:(?:[0-9]+:)?(?:{{PC}} +){0,2}{{FUNC}}|(?:[0-9]+:)?0x[0-9a-f]+"
    r"|(?:[0-9]+:)?{{PC}} +\[< *\(null\)>\] +\(null\)|[0-9]+: +\(null\))"
)
CALL_TRACE = r"(?:Call (?:T|t)race:)|(?:Backtrace:)"
_FAULT = (RIP, CALL_TRACE, STACK)
_TRACE = (CALL_TRACE, STACK)


def _warning(*skip: str) -> dict:
    # Newer kernels trap on WARN: the function is on the RIP line ("--- interrupt:" on
    # powerpc); older ones just print the stack.
    return {"stack": ("(?:" + RIP + "|--- interrupt: [0-9]+ at {{FUNC}})", STACK),
            "stack2": (CALL_TRACE, STACK), "skip": skip}


# Stalls and lockups loop somewhere across several functions, and the top frame is wherever
# the loop was when the watchdog looked: the function called from the nearest entry point
# (syscall, work item, timer, softirq, ...) names them instead.
_STALL_ANCHORS = re.compile("|".join((
    "process_one_work", "do_syscall_", "do_fast_syscall_", "sysenter_dispatch", "tracesys_phase2",
    "el0_svc_handler", "invoke_syscall", "ret_fast_syscall", "netif_receive_skb", "do_softirq",
    "call_timer_fn", "_run_timers", "run_timer_softirq", "hrtimer_run", "run_ksoftirqd",
    "smpboot_thread_fn", "^kthread$", "start_secondary", "cpu_startup_entry", "ret_from_fork",
    "vfs_write", "vfs_read", "vfs_iter_read", "vfs_iter_write", "do_iter_read", "do_iter_write",
    "call_read_iter", "call_write_iter", "new_sync_read", "new_sync_write", "vfs_ioctl",
    "ksys_ioctl", "compat_ioctl", "compat_sys_ioctl", "blkdev_driver_ioctl", "blkdev_ioctl",
    "do_iter_readv_writev", "^call_mmap", "mmap_region", "do_mmap", "do_dentry_open", "vfs_open",
    "^sock_sendmsg", "^sock_recvmsg", "^sock_release", "^__sock_release", "^setsockopt$",
    "kernel_setsockopt", "sock_common_setsockopt", "^listen$", "kernel_listen",
    "sk_common_release", "^sock_mmap", "^accept$", "kernel_accept", "^sock_do_ioctl",
    "^sock_ioctl", "^compat_sock_ioctl", "^nfnetlink_rcv_msg", "^rtnetlink_rcv_msg",
    "^netlink_dump", "^(sys_)?(socketpair|connect|ioctl)", "__do_fault", "do_page_fault",
    "^page_fault$", "__fput", "task_work_run", "exit_to_usermode", "smp_call_function",
    "tasklet_action", "tasklet_hi_action",
)))


def stall_frame(names: list[str]) -> tuple[int, str | None]:
    """The frame just above the first entry point of a stalled stack (-1 when it has none), and
    the name to give it when not its own."""
    for i, name in enumerate(names):
        if _STALL_ANCHORS.search(name):
            if "smp_call_function" in name:
                return i, "smp_call_function"
            return max(i - 1, 0), None
    return -1, None


def lockup_frame(names: list[str]) -> tuple[int, str | None]:
    """As `stall_frame`, or the top frame when the stack has no entry point (NMI backtraces)."""
    index, name = stall_frame(names)
    return (0, None) if index < 0 and names else (index, name)


_HANG_SKIP = ("sched", "_lock", "_slowlock", "down", "rwsem", "completion", "kthread", "wait",
              "synchronize", "context_switch", "__switch_to", "cancel_delayed_work", "rcu_barrier")
_SYNCHRONIZE_RCU = ("synchronize_rcu", "synchronize_srcu", "synchronize_net", "synchronize_sched")


def hang_frame(names: list[str]) -> tuple[int, str | None]:
    """The frame a hung task waits in: hangs on rtnl_lock and on synchronize_rcu are one bug
    each, whoever waits; otherwise the first frame that is not scheduling, locking or waiting."""
    for i, name in enumerate(names):
        if "rtnl_lock" in name:
            return i, None
        if any(s in name for s in _SYNCHRONIZE_RCU):
            return i, "synchronize_rcu"
    for i, name in enumerate(names):
        if not any(s in name for s in _HANG_SKIP):
            return i, None
    return -1, None


#: Frames that are never guilty (substrings or patterns of the function's name).
SKIP: tuple[str, ...] = (
    "__sanitizer", "__asan", "kasan", "hwasan", "__msan", "kmsan", "kcsan_setup_watchpoint",
    "check_memory_region", "check_heap_object", "check_object", "read_word_at_a_time",
    "(read|write)_once_.*nocheck", "print_address_description", "panic", "invalid_op",
    "report_bug", "fixup_bug", "print_report", "print_usage_bug", "do_error", "_trap$|do_trap",
    "show_stack", "dump_stack", "walk_stack", "dump_backtrace", "warn_slowpath", "warn_alloc",
    "warn_bogus", "__warn", "alloc_page", "k?v?(?:m|z|c)alloc", "krealloc", "kmem_cache",
    "allocate_slab", "__alloc_frozen_pages_noprof", "folio_(?:alloc|unlock)",
    "filemap_alloc_folio", "__filemap_get_folio", "find_or_create_page", "do_read_cache_folio",
    "read_cache_page", "pagecache_get_page", "grab_cache_page_write_begin", "slab_",
    "debug_object", "timer_is_static_object", "work_is_static_object", "__might_fault",
    "print_unlock", "imbalance_bug", "lockdep", "bh_enable", "bh_disable", "perf_trace",
    "lock_acquire", "lock_release", "lock_class", "mark_lock", "(reacquire|mark)_held_locks",
    "raw_spin_rq", "spin_lock", "spin_trylock", "spin_unlock", "read_lock", "read_trylock",
    "write_lock", "write_trylock", "read_unlock", "write_unlock", "^down$", "down_read",
    "down_write", "down_read_trylock", "down_write_trylock", "down_trylock", "up_read",
    "up_write", "^mutex_", "^__mutex_", "^rt_mutex_", "owner_on_cpu", "osq_lock", "osq_unlock",
    "atomic(64)?_(dec|inc|read|set|or|xor|and|add|sub|fetch|xchg|cmpxchg|try)",
    "(set|clear|change|test)_bit", "__wake_up", "^refcount_", "^kref_", "ref_tracker",
    "seqprop_assert", "memcpy", "memcmp", "memset", "memchr", "memmove", "memdup", "strcmp",
    "strncmp", "strcpy", "strlcpy", "strncpy", "strscpy", "strlen", "strstr", "strnstr",
    "strnlen", "strchr", "strdup", "strndup", "copy_to_user", "copy_from_user", "copy_to_iter",
    "copy_from_iter", "copy_page_to_iter", "copy_page_from_iter", "copy_folio_to_iter",
    "^copyin$", "^copyout$", "put_user", "get_user", "might_fault", "might_sleep", "list_add",
    "list_del", "list_replace", "list_move", "list_splice", "^rb_", "^__rb_", "_indirect_thunk_",
    "string", "pointer", "snprintf", "scnprintf", "kasprintf", "kvasprintf", "printk",
    "va_format", "dev_info", "dev_notice", "dev_warn", "dev_err", "dev_alert", "dev_crit",
    "dev_emerg", "program_check_exception", "program_check_common", "del_timer", "flush_work",
    "__cancel_work_timer", "cancel_work_sync", "try_to_grab_pending", "flush_workqueue",
    "drain_workqueue", "destroy_workqueue", "queue_work", "finish_wait", "kthread_stop",
    "kobject_", "add_uevent_var", "get_device_parent", "device_add", "device_del",
    "device_unregister", "device_destroy", "device_release", "devres_release_all",
    "hwrng_unregister", "i2c_del_adapter", "__unregister_client", "device_for_each_child",
    "rollback_registered", "unregister_netdev", "sysfs_remove", "device_remove_file",
    "tty_unregister_device", "dummy_urb_enqueue", "usb_kill_urb", "usb_kill_anchored_urbs",
    "usb_control_msg", "usb_hcd_submit_urb", "usb_submit_urb", "^complete$",
    "wait_for_completion", "^kv?free$", "kfree_skb", "readb$", "readw$", "readl$", "readq$",
    "writeb$", "writew$", "writel$", "writeq$", "logic_in", "logic_out", r"^crc\d+",
    "crc_itu_t", "__might_resched", "assertfail", "^iput$", "^iput_final$", "^ihold$",
    "hex_dump_to_buffer", "print_hex_dump", "^klist_", "(trace|lockdep)_(hard|soft)irq",
    "^(un)?lock_page", "stack_trace_consume_entry", "arch_stack_walk", "stack_trace_save",
    "insert_work", "__queue_delayed_work", "queue_delayed_work_on", "ida_free",
    "do_(kernel|translation)_fault", "do_mem_abort", "el1_abort", "el1h_64_sync(?:_handler)?",
    "print_tainted", "xas_(?:start|load|find)", "find_lock_entries", "truncate_inode_pages_range",
    "__phys_addr", "__fortify_report", "cleanup_srcu_struct", "rhashtable_lookup",
    "extract_(user|iter)_to_sg", "drop_nlink", "^get_taint$", "^put_device$", "lock_timer_base",
    "__timer_delete_sync", "sk_stop_timer_sync", "__mod_timer", "fast_dput", "dput",
    "mark_buffer_dirty",
)

#: Syscall entry points are named without these prefixes (the shortest name wins).
STRIP_PREFIXES = ("SYSC_", "SyS_", "sys_", "__x64_", "__ia32_", "__arm64_", "____sys_", "___sys_",
                  "__sys_", "__se_", "__se_sys_", "__do_sys_", "compat_SYSC_", "compat_SyS_", "ksys_")

_BUG = (
    _f("BUG: KASAN:", "KASAN: {0} {2} in {f}",
       report=r"BUG: KASAN: ([a-z\-]+) in {{FUNC}}(?:.*\n)+?.*(Read|Write) (?:of size|at addr) (?:[0-9a-f]+)",
       stack=(r"BUG: KASAN: (?:[a-z\-]+) in {{FUNC}}", CALL_TRACE, STACK),
       skip=("kernel_fault", "tag_check", "mem_abort", "^el1_", "^el1h_")),
    _f("BUG: KASAN:", "KASAN: invalid-free in {f}",
       report=r"BUG: KASAN: (?:double-free or invalid-free|double-free|invalid-free) in {{FUNC}}",
       stack=(r"BUG: KASAN: (?:double-free or invalid-free|double-free|invalid-free) in {{FUNC}}",
              CALL_TRACE, STACK),
       skip=("slab_", "kfree", "vunmap", "vfree")),
    _f(r"BUG: KASAN: ([a-z\-]+) on address(?:.*\n)+?.*(Read|Write) of size ([0-9]+)", "KASAN: {0} {1}"),
    _f("BUG: KASAN: (.*)", "KASAN: {0}"),
    _f("BUG: KMSAN:", "KMSAN: {0} in {f}", report=r"BUG: KMSAN: ([a-z\-]+) in {{FUNC}}",
       stack=(STACK, "(Local variable .* created at:|Uninit was created at:)", STACK),
       skip=("alloc_skb", "netlink_ack", "netlink_rcv_skb", "_encrypt$", "^(?:crypto|cipher|drbg|rng)_")),
    _f("BUG: KCSAN: (.*)", "KCSAN: {0}"),
    _f(r"BUG: KFENCE: (use-after-free|out-of-bounds) (read|write) in {{FUNC}}", "KFENCE: {0} {1} in {f}",
       stack=(r"BUG: KFENCE: (?:[a-z\- ]+) in {{FUNC}}", STACK)),
    _f("BUG: KFENCE: invalid free in {{FUNC}}", "KFENCE: invalid free in {f}",
       stack=(r"BUG: KFENCE: (?:[a-z\- ]+) in {{FUNC}}", STACK)),
    _f("BUG: KFENCE: invalid (read|write) in {{FUNC}}", "KFENCE: invalid {0} in {f}",
       stack=(r"BUG: KFENCE: (?:[a-z\- ]+) in {{FUNC}}", STACK)),
    _f("BUG: KFENCE: memory corruption in {{FUNC}}", "KFENCE: memory corruption in {f}",
       stack=(r"BUG: KFENCE: (?:[a-z\- ]+) in {{FUNC}}", STACK)),
    _f("BUG: (?:unable to handle kernel paging request|unable to handle page fault for address"
       "|Unable to handle kernel data access)", "BUG: unable to handle kernel paging request in {f}",
       stack=_FAULT),
    _f("BUG: (?:unable to handle kernel NULL pointer dereference|kernel NULL pointer dereference"
       "|Kernel NULL pointer dereference)", "BUG: unable to handle kernel NULL pointer dereference in {f}",
       stack=_FAULT),
    _f("BUG: (?:unable to handle kernel|Unable to handle kernel)", "BUG: unable to handle kernel"),
    _f("BUG: (spinlock|rwlock) (lockup suspected|already unlocked|recursion|cpu recursion|bad magic"
       "|wrong owner|wrong CPU|trylock failure on UP)", "BUG: {0} {1} in {f}",
       stack=_TRACE, skip=("spin_", "_lock", "_unlock")),
    _f("BUG: soft lockup", "BUG: soft lockup in {f}", stack=_FAULT, extractor=stall_frame),
    _f("BUG: .*still has locks held!", "BUG: still has locks held in {0}",
       report=r"BUG: .*still has locks held!(?:.*\n)+?.*{{PC}} +{{FUNC}}", frame_group=1),
    _f("BUG: scheduling while atomic", "BUG: scheduling while atomic in {f}", stack=_TRACE,
       skip=("schedule",)),
    _f("BUG: lock held when returning to user space", "BUG: lock held when returning to user space in {0}",
       report=r"BUG: lock held when returning to user space(?:.*\n)+?.*leaving the kernel with locks "
              r"still held(?:.*\n)+?.*at: (?:{{PC}} +)?{{FUNC}}", frame_group=1),
    _f("BUG: bad unlock balance detected!", "BUG: bad unlock balance in {f}",
       stack=("{{PC}} +{{FUNC}}", CALL_TRACE, STACK)),
    _f("BUG: held lock freed!", "BUG: held lock freed in {0}",
       report=r"BUG: held lock freed!(?:.*\n)+?.*{{PC}} +{{FUNC}}", frame_group=1),
    _f("BUG: Bad rss-counter state", "BUG: Bad rss-counter state"),
    _f("BUG: non-zero nr_ptes on freeing mm", "BUG: non-zero nr_ptes on freeing mm"),
    _f("BUG: non-zero nr_pmds on freeing mm", "BUG: non-zero nr_pmds on freeing mm"),
    _f("BUG: Dentry .* still in use", "BUG: Dentry still in use in {0}",
       report=r"BUG: Dentry .* still in use \([0-9]+\) \[(unmount) of ([^\]]+)\]"),
    _f("BUG: Bad page (state|cache)", "BUG: Bad page {0} in {f}",
       stack=("page last allocated", STACK),
       skip=("(free|put|get|update|release)_page", "free_unref", "^_*folio", "truncate_inode_pages",
             "page_frag_free", "alloc", "vmap", "page_owner")),
    _f("BUG: Bad page map", "BUG: Bad page map"),
    _f("BUG: workqueue lockup", "BUG: workqueue lockup"),
    _f("BUG: sleeping function called from invalid context at (.*)",
       "BUG: sleeping function called from invalid context in {f}", stack=_TRACE),
    _f(r"BUG: using ([a-z_]+)\(\) in preemptible", "BUG: using {0}() in preemptible code in {f}",
       stack=_TRACE, skip=("dump_stack", "preemption", "preempt", "debug_", "processor_id", "this_cpu")),
    _f("BUG: workqueue leaked lock or atomic", "BUG: workqueue leaked lock or atomic in {0}",
       report=r"BUG: workqueue leaked lock or atomic(?:.*\n)+?.*last function: ([a-zA-Z0-9_]+)\n"),
    _f("BUG: memory leak", "memory leak in {f}",
       stack=(r"backtrace(?: \(crc [0-9a-fA-F]*\))?:", STACK),
       skip=("kmemleak", "mmap", "kmem", "slab", "alloc", "create_object", "idr_get", "list_lru_init",
             "kasprintf", "kvasprintf", "pcpu_create", "strdup", "strndup", "memdup")),
    _f("BUG: .*stack guard page was hit at", "BUG: stack guard page was hit in {f}", stack=_FAULT,
       extractor=stall_frame),
    _f("BUG: Invalid wait context", "WARNING: locking bug in {f}", stack=_TRACE,
       skip=("lock_sock", "release_sock")),
    _f(r"BUG:\s*(?:\n|$)", "BUG: corrupted"),
)

_WARNING = (
    _f(r"WARNING: .*lib/debugobjects\.c.* (?:debug_print|debug_check|at)", "WARNING: ODEBUG bug in {f}",
       **_warning("debug_", "rcu", "hrtimer_", "timer_", "work_", "percpu_", "vunmap", "vfree",
                  "__free_", "debug_check", "kobject_")),
    _f(r"WARNING: .*mm/usercopy\.c.* (?:usercopy_warn|at)", "WARNING: bad usercopy in {f}",
       **_warning("usercopy", "__check")),
    _f(r"WARNING: .*lib/kobject\.c.* (?:kobject_|at)", "WARNING: kobject bug in {f}", **_warning("kobject_")),
    _f(r"WARNING: .*fs/proc/generic\.c.* (?:proc_register|at)", "WARNING: proc registration bug in {f}",
       **_warning("proc_")),
    _f(r"WARNING: .*lib/refcount\.c.* (?:refcount_|at)", "WARNING: refcount bug in {f}",
       **_warning("refcount", "kobject_")),
    _f(r"WARNING: .*kernel/locking/lockdep\.c.*lock_", "WARNING: locking bug in {f}",
       **_warning("lock_sock", "release_sock")),
    _f("WARNING: .*still has locks held!", "WARNING: still has locks held in {0}",
       report=r"WARNING: .*still has locks held!(?:.*\n)+?.*at: {{FUNC}}", frame_group=1),
    _f("WARNING: Nested lock was not taken", "WARNING: nested lock was not taken in {f}", **_warning()),
    _f("WARNING: lock held when returning to user space",
       "WARNING: lock held when returning to user space in {0}",
       report=r"WARNING: lock held when returning to user space(?:.*\n)+?.*leaving the kernel with locks "
              r"still held(?:.*\n)+?.*at: (?:{{PC}} +)?{{FUNC}}", frame_group=1),
    _f(r"WARNING: .*mm/.*\.c.* k?.?malloc", "WARNING: kmalloc bug in {f}",
       **_warning("kmalloc", "krealloc", "slab", "kmem")),
    _f("WARNING: .*mm/vmalloc.c.*__vmalloc_node", "WARNING: zero-size vmalloc in {f}", **_warning()),
    _f("WARNING: .* usb_submit_urb", "WARNING in {f}/usb_submit_urb",
       **_warning("usb_submit_urb", "usb_start_wait_urb", "usb_bulk_msg", "usb_interrupt_msg",
                  "usb_control_msg")),
    _f(r"WARNING: {{SRC}} at 0x\d+, CPU#\d+", "WARNING in {f}", **_warning()),
    _f("WARNING: .* at {{SRC}} {{FUNC}}", "WARNING in {f}", **_warning()),
    _f("WARNING: {{SRC}} at {{FUNC}}", "WARNING in {f}", **_warning()),
    _f(r"WARNING: \[.*\] {{SRC}} at {{FUNC}}.*", "WARNING in {f}", **_warning()),
    # Before Linux 3.13: "WARNING: at net/core/dev.c:1915 skb_warn_bad_offload+0x99/0xb0()".
    _f("WARNING: at {{SRC}} {{FUNC}}", "WARNING in {f}", **_warning()),
    _f("WARNING: possible circular locking dependency detected", "possible deadlock in {f}",
       report=r"WARNING: possible circular locking dependency detected(?:.*\n)+?.*is trying to acquire lock",
       stack=("at: (?:{{PC}} +)?{{FUNC}}", "at: (?:{{PC}} +)?{{FUNC}}", STACK),
       skip=("process_one_work", "flush_workqueue", "drain_workqueue", "destroy_workqueue")),
    _f("WARNING: possible irq lock inversion dependency detected", "possible deadlock in {0}",
       report=r"WARNING: possible irq lock inversion dependency detected(?:.*\n)+?.*just changed the state "
              r"of lock(?:.*\n)+?.*at: (?:{{PC}} +)?{{FUNC}}", frame_group=1),
    _f("WARNING: .*-safe -> .*-unsafe lock order detected", "possible deadlock in {f}",
       stack=("which became (?:.*) at:", STACK)),
    _f("WARNING: possible recursive locking detected", "possible deadlock in {0}",
       report=r"WARNING: possible recursive locking detected(?:.*\n)+?.*is trying to acquire lock"
              r"(?:.*\n)+?.*at: (?:{{PC}} +)?{{FUNC}}", frame_group=1),
    _f("WARNING: inconsistent lock state", "inconsistent lock state in {f}",
       report=r"WARNING: inconsistent lock state(?:.*\n)+?.*takes(?:.*\n)+?.*at: (?:{{PC}} +)?{{FUNC}}",
       stack=_TRACE),
    _f("WARNING: suspicious RCU usage", "WARNING: suspicious RCU usage in {f}",
       report=r"WARNING: suspicious RCU usage(?:.*\n)+?.*?{{SRC}}", stack=_TRACE, skip=("rcu", "kmem", "slab")),
    _f("WARNING: kernel stack regs at [0-9a-f]+ in [^ ]* has bad '([^']+)' value",
       "WARNING: kernel stack regs has bad '{0}' value"),
    _f("WARNING: kernel stack frame pointer at [0-9a-f]+ in [^ ]* has bad value",
       "WARNING: kernel stack frame pointer has bad value"),
    _f("WARNING: bad unlock balance detected!", "WARNING: bad unlock balance in {f}",
       stack=("{{PC}} +{{FUNC}}", CALL_TRACE, STACK)),
    _f("WARNING: held lock freed!", "WARNING: held lock freed in {0}",
       report=r"WARNING: held lock freed!(?:.*\n)+?.*at:(?: {{PC}})? +{{FUNC}}", frame_group=1),
    _f("WARNING: kernel stack regs .* has bad 'bp' value", "WARNING: kernel stack regs has bad value"),
    _f("WARNING: kernel stack frame pointer .* has bad value", "WARNING: kernel stack regs has bad value"),
    _f(r"WARNING:\s*(?:\n|$)", "WARNING: corrupted"),
)

_INFO = (
    _f("INFO: possible circular locking dependency detected", "possible deadlock in {0}",
       report=r"INFO: possible circular locking dependency detected \](?:.*\n)+?.*is trying to acquire lock"
              r"(?:.*\n)+?.*at: {{PC}} +{{FUNC}}", frame_group=1),
    _f("INFO: possible irq lock inversion dependency detected", "possible deadlock in {0}",
       report=r"INFO: possible irq lock inversion dependency detected \](?:.*\n)+?.*just changed the "
              r"state of lock(?:.*\n)+?.*at: {{PC}} +{{FUNC}}", frame_group=1),
    _f("INFO: SOFTIRQ-safe -> SOFTIRQ-unsafe lock order detected", "possible deadlock in {0}",
       report=r"INFO: SOFTIRQ-safe -> SOFTIRQ-unsafe lock order detected \](?:.*\n)+?.*is trying to "
              r"acquire(?:.*\n)+?.*at: {{PC}} +{{FUNC}}", frame_group=1),
    _f("INFO: possible recursive locking detected", "possible deadlock in {0}",
       report=r"INFO: possible recursive locking detected \](?:.*\n)+?.*is trying to acquire lock"
              r"(?:.*\n)+?.*at: {{PC}} +{{FUNC}}", frame_group=1),
    _f("INFO: inconsistent lock state", "inconsistent lock state in {0}",
       report=r"INFO: inconsistent lock state \](?:.*\n)+?.*takes(?:.*\n)+?.*at: {{PC}} +{{FUNC}}",
       frame_group=1),
    _f("INFO: rcu_(?:preempt|sched|bh|tasks) (?:self-)?detected(?: expedited)? stall",
       "INFO: rcu detected stall in {f}",
       stack=("apic_timer_interrupt", RIP, STACK),
       stack2=("(?:apic_timer_interrupt|Exception stack|el1h_64_irq)", STACK),
       skip=("apic_timer_interrupt", "rcu"), extractor=stall_frame),
    _f("INFO: trying to register non-static key", "INFO: trying to register non-static key in {f}",
       stack=_TRACE, skip=("stack", "lock", "IRQ")),
    _f("INFO: suspicious RCU usage", "INFO: suspicious RCU usage in {f}",
       report=r"INFO: suspicious RCU usage(?:.*\n)+?.*?{{SRC}}", stack=_TRACE, skip=("rcu", "kmem", "slab")),
    _f("INFO: task {{TASK}} blocked (?:in I/O wait )?for more than [0-9]+ seconds", "INFO: task hung in {f}",
       stack=_TRACE, extractor=hang_frame),
    _f("INFO: task {{TASK}} can't die for more than .* seconds", "INFO: task can't die in {f}",
       stack=_TRACE, skip=("schedule",)),
    _f("INFO: (Freed|Allocated) in (.*)", "INFO: {0} in {1}"),
    _f(r"INFO:\s*(?:\n|$)", "INFO: corrupted"),
)

_PANIC = (
    _f("Kernel panic - not syncing: stack-protector:", "kernel panic: stack is corrupted in {0}",
       report="Kernel panic - not syncing: stack-protector: Kernel stack is corrupted in: {{FUNC}}",
       frame_group=1),
    _f("Kernel panic - not syncing: stack-protector:", "kernel panic: stack is corrupted in {f}",
       report="Kernel panic - not syncing: stack-protector: Kernel stack is corrupted in: [a-f0-9]+",
       stack=_TRACE, skip=("stack_chk",)),
    _f("Kernel panic - not syncing: corrupted stack end", "kernel panic: corrupted stack end in {f}",
       report="Kernel panic - not syncing: corrupted stack end detected inside scheduler",
       stack=_TRACE, skip=("schedule", "retint_kernel"), extractor=stall_frame),
    _f("Kernel panic - not syncing: kernel stack overflow", "kernel stack overflow in {f}",
       stack=_TRACE, skip=("bad_stack",), extractor=stall_frame),
    _f("Kernel panic - not syncing: Attempted to kill init!", "kernel panic: Attempted to kill init!"),
    _f("Kernel panic - not syncing: Couldn't open N_TTY ldisc for [^ ]+ --- error -[0-9]+",
       "kernel panic: Couldn't open N_TTY ldisc"),
    _f("Kernel panic - not syncing: Fatal exception", "kernel panic: Fatal exception"),
    _f("Kernel panic - not syncing: panic_on_warn set", "kernel panic: panic_on_warn set"),
    _f("Kernel panic - not syncing: hung_task: blocked tasks", "kernel panic: hung_task: blocked tasks"),
    _f("Kernel panic - not syncing: (.*)", "kernel panic: {0}"),
)

_KERNEL_BUG = (
    _f("kernel BUG at mm/usercopy.c", "BUG: bad usercopy in {f}", stack=_TRACE, skip=("usercopy", "__check")),
    _f("kernel BUG at lib/list_debug.c", "BUG: corrupted list in {f}", stack=_TRACE),
    # Many skb wrappers hold a BUG_ON, but the bug is almost always in their caller.
    _f("kernel BUG at (.*)", "kernel BUG in {f}", stack=_FAULT, skip=("^skb_",)),
)

_UBSAN = (
    _f("UBSAN:", "UBSAN: undefined-behaviour in {f}", report="UBSAN: Undefined behaviour in",
       stack=_TRACE, skip=("ubsan", "overflow")),
    _f("UBSAN: array-index-out-of-bounds in", "UBSAN: array-index-out-of-bounds in {f}", stack=_TRACE,
       skip=("ubsan", "overflow")),
    _f("UBSAN:", "UBSAN: {0} in {f}", report="UBSAN: (.*?) in", stack=_TRACE, skip=("ubsan", "overflow")),
)


def _faulting(header: str, text: str, parts=_FAULT) -> tuple:
    return (_f(header, text, stack=parts),)


def _suppress(*patterns: str) -> tuple[re.Pattern, ...]:
    return tuple(re.compile(p) for p in patterns)


#: Per report header (a substring of its first line, tried in this order): the title formats,
#: and the lines with that text that are not reports.
GROUPS: tuple[tuple[str, tuple[TitleFormat, ...], tuple[re.Pattern, ...]], ...] = (
    ("BUG:", _BUG, _suppress("ODEBUG:", "Boot_DEBUG:", "xlog_status:", "DEBUG:")),
    ("WARNING:", _WARNING, _suppress(
        "WARNING: /etc/ssh/moduli does not exist, using fixed modulus",
        "WARNING: workqueue cpumask: online intersect > possible intersect",
        "WARNING: [Tt]he mand mount option", r"WARNING: Unsupported flag value\(s\) of 0x%x in DT_FLAGS_1",
        "WARNING: Unprivileged eBPF is enabled with eIBRS", "WARNING: fbcon: Driver '(.*)' missed to adjust",
        "WARNING: See https.* for mitigation options.", "WARNING: kernel not compiled with CPU_SRSO",
        r"EXT4-[Ff][Ss](?: \(.*\))?:", "(?i)warning: .* uses (deprecated v2 capabilities|wireless extensions)",
        r"XFS \(\w+\): WARNING")),
    ("INFO:", _INFO, _suppress(
        "INFO: lockdep is turned off", "INFO: Stall ended before state dump start", "INFO: NMI handler",
        "INFO: recovery required on readonly filesystem", "(handler|interrupt).*took too long",
        "_INFO:")),
    ("Unable to handle kernel", (
        _f("Unable to handle kernel (paging request|NULL pointer dereference|access to user memory)",
           "BUG: unable to handle kernel {0} in {f}", stack=_FAULT),), ()),
    ("general protection fault", _faulting("general protection fault.*:", "general protection fault in {f}"),
     _suppress(r"general protection fault .* error:\d+ in ")),
    ("stack segment: ", _faulting("stack segment: ", "stack segment fault in {f}"), ()),
    ("Kernel panic", _PANIC, ()),
    ("PANIC: double fault", _faulting("PANIC: double fault", "PANIC: double fault in {f}", (RIP,)), ()),
    ("kernel BUG", _KERNEL_BUG, ()),
    ("Kernel BUG", (_f("Kernel BUG (.*)", "kernel BUG {0}"),), ()),
    ("BUG kmalloc-", (_f("BUG kmalloc-.*: Object already free", "BUG: Object already free"),), ()),
    ("divide error:", _faulting("divide error: ", "divide error in {f}", (RIP,)), ()),
    ("divide_error:", _faulting("divide_error: ", "divide error in {f}", (RIP,)), ()),
    ("invalid opcode:", _faulting("invalid opcode: ", "invalid opcode in {f}", (RIP,)), ()),
    ("int3:", _faulting("int3: ", "int3 in {f}"), ()),
    ("UBSAN:", _UBSAN, ()),
    ("unregister_netdevice: waiting for", (
        _f("unregister_netdevice: waiting for (?:.*) to become free",
           "unregister_netdevice: waiting for DEV to become free"),), ()),
    ("VFS: Close: file count is 0", (
        _f("VFS: Close: file count is 0", "VFS: Close: file count is zero (use-after-free)"),), ()),
    ("VFS: Busy inodes after unmount", (
        _f("VFS: Busy inodes after unmount", "VFS: Busy inodes after unmount (use-after-free)"),), ()),
    ("Internal error:", _faulting("Internal error:", "Internal error in {f}"), ()),
    ("Unhandled fault:", _faulting("Unhandled fault:", "Unhandled fault in {f}"), ()),
    ("Alignment trap:", _faulting("Alignment trap:", "Alignment trap in {f}"), ()),
    # Shapes syzkaller leaves to panics (it panics on the first report), named the same way.
    ("hard LOCKUP", (_f("hard LOCKUP", "BUG: hard lockup in {f}", stack=_FAULT, extractor=lockup_frame),), ()),
    ("Hard LOCKUP", (_f("Hard LOCKUP", "BUG: hard lockup in {f}", stack=_FAULT, extractor=lockup_frame),), ()),
    ("Oops", (_f(r"Oops(?::| -| \[#)", "Oops in {f}", stack=_FAULT),), ()),
)

#: Headers that may come in the middle of another report without starting a new one.
REPORT_START_IGNORES = _suppress(
    "invalid opcode: 0000", "Kernel panic - not syncing", "unregister_netdevice: waiting for",
    "PANIC: double fault", "Internal error:", "hard LOCKUP", "Hard LOCKUP", "Oops",
)
