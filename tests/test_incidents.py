"""Incident detection: every rule, the lines that must not match, the measured corpus, signatures."""

from __future__ import annotations

import glob
import os
import re
import time

from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.trial import unittest

from tempesta_ts import config
from tempesta_ts.buffers import BufferRegistry
from tempesta_ts.incidents import (
    KINDS,
    LEAD,
    RULES,
    STAMP,
    Detection,
    Rules,
    find_header,
    is_end_marker,
    signature,
)
from tests.captures import DATA as NETCONSOLE
from tests.captures import expected_lines

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "incidents")
# The decoder's plain-line prefix (netconsole.py): an optional <level>, then [seconds.micros].
PREFIX = re.compile(r"^(?:<\d{1,3}>)?(?:\[\s*\d+\.\d{6}\] ?)?")

# (line as the decoder gives it, kind, rule): shapes printed by x86-64 and arm64 kernels and by
# Tempesta FW, most taken from the corpus.
EXAMPLES = [
    ("Kernel panic - not syncing: sysrq triggered crash", "crash", "kernel-panic"),
    (
        "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)",
        "crash",
        "kernel-panic",
    ),
    ("Kernel panic - not syncing: Fatal exception in interrupt", "crash", "kernel-panic"),
    ("Kernel panic - not syncing: Hard LOCKUP", "crash", "kernel-panic"),
    ("sysrq: Trigger a crash", "crash", "sysrq-crash"),
    ("SysRq : Trigger a crash", "crash", "sysrq-crash"),
    ("Oops: 0002 [#1] PREEMPT SMP NOPTI", "oops", "oops"),
    ("Oops: 0000 [#1] SMP PTI", "oops", "oops"),
    ("Oops [#1]", "oops", "oops"),
    ("Oops[#7]:", "oops", "oops"),
    ("general protection fault: 0000 [#1] SMP KASAN", "oops", "trap"),
    (
        "general protection fault, probably for non-canonical address 0xdffffc0000000000: 0000 [#1]"
        " PREEMPT SMP KASAN",
        "oops",
        "trap",
    ),
    (
        "Oops: general protection fault, probably for non-canonical address 0xdffffc0000000006: 0000"
        " [#1] PREEMPT SMP KASAN PTI",
        "oops",
        "trap",
    ),
    ("invalid opcode: 0000 [#1] SMP NOPTI", "oops", "trap"),
    ("divide error: 0000 [#1] PREEMPT SMP NOPTI", "oops", "trap"),
    ("stack segment: 0000 [#1] PREEMPT SMP NOPTI", "oops", "trap"),
    ("Oops: stack segment: 0000 [#1] SMP KASAN PTI", "oops", "trap"),
    ("double fault: 0000 [#1] SMP", "oops", "trap"),
    ("kernel stack overflow (double-fault): 0000 [#1] SMP", "oops", "trap"),
    ("Internal error: Oops: 0000000096000004 [#1] PREEMPT SMP", "oops", "internal-error"),
    ("Internal error: Oops - BUG: 00000000f2000800 [#1] PREEMPT SMP", "oops", "internal-error"),
    ("Internal error: Oops - undefined instruction: 0 [#1] SMP ARM", "oops", "internal-error"),
    (
        "Unable to handle kernel NULL pointer dereference at virtual address 0000000000000008",
        "oops",
        "unable-to-handle",
    ),
    (
        "Unable to handle kernel paging request at virtual address ffff800012345678",
        "oops",
        "unable-to-handle",
    ),
    (
        "CPU 0 Unable to handle kernel paging request at virtual address fffffff0, epc =="
        " 8003ab3c, ra == 80036f64",
        "oops",
        "unable-to-handle",
    ),
    (
        "Unable to handle kernel execute from non-executable memory at virtual address ffffbd2fe97a3ba0",
        "oops",
        "unable-to-handle",
    ),
    ("SError Interrupt on CPU3, code 0x00000000bf000000 -- SError", "oops", "arm64-exception"),
    (
        "Bad mode in Synchronous Abort handler detected on CPU0, code 0x86000007 -- IABT (current EL)",
        "oops",
        "arm64-exception",
    ),
    ("kernel BUG at mm/slub.c:123!", "bug", "kernel-bug"),
    ("kernel BUG at /root/tempesta/fw/apm.c:1050!", "bug", "kernel-bug"),
    ("Kernel BUG at c0044d34 [verbose debug info unavailable]", "bug", "kernel-bug"),
    ("BUG: KASAN: slab-out-of-bounds in ttls_hs_done+0x16/0x30 [tempesta_tls]", "bug", "kasan"),
    ("BUG: KASAN: use-after-free in __list_del_entry_valid+0x30/0xe0", "bug", "kasan"),
    ("BUG: KFENCE: use-after-free read in bfq_exit_icq_bfqq+0x132/0x270", "bug", "kfence"),
    ("BUG: KFENCE: out-of-bounds read in test_out_of_bounds_read+0xa6/0x234", "bug", "kfence"),
    ("BUG: KCSAN: data-race in rcu_all_qs / rcu_note_context_switch", "bug", "kcsan"),
    ("BUG: KMSAN: uninit-value in tipc_conn_recvmsg+0x3a5/0x6e0", "bug", "kmsan"),
    ("PANIC: double fault, error_code: 0x0", "crash", "double-fault"),
    ("divide_error: 0000 [#1] SMP", "oops", "trap"),
    ("int3: 0000 [#1] PREEMPT SMP KASAN", "oops", "trap"),
    ("BUG: memory leak", "bug", "memory-leak"),
    ("unreferenced object 0xffff88810ee5e800 (size 1024):", "bug", "memory-leak"),
    ("kmemleak: unreferenced object 0xffff8881125b1a00 (size 64):", "bug", "memory-leak"),
    (
        "unregister_netdevice: waiting for lo to become free. Usage count = 2",
        "bug",
        "netdev-refcount",
    ),
    ("VFS: Close: file count is 0", "bug", "vfs"),
    ("VFS: Close: file count is 0 (f_op=shmem_file_operations)", "bug", "vfs"),
    ("VFS: Busy inodes after unmount of sda1 (ext4)", "bug", "vfs"),
    (
        "VFS: Busy inodes after unmount of loop0. Self-destruct in 5 seconds.  Have a nice day...",
        "bug",
        "vfs",
    ),
    ("BUG: using __this_cpu_read() in preemptible [00000000] code: syz-executor/8053", "bug", "bug"),
    ("BUG: soft lockup - CPU#3 stuck for 22s! [kworker/3:1:123]", "bug", "soft-lockup"),
    ("watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [tempesta.sh:34314]", "bug", "soft-lockup"),
    (
        "NMI watchdog: BUG: soft lockup - CPU#10 stuck for 22s! [migration/10:346]",
        "bug",
        "soft-lockup",
    ),
    ("NMI watchdog: Watchdog detected hard LOCKUP on cpu 2", "bug", "hard-lockup"),
    ("watchdog: Watchdog detected hard LOCKUP on cpu 3", "bug", "hard-lockup"),
    ("watchdog: CPU2: Watchdog detected hard LOCKUP on cpu 3", "bug", "hard-lockup"),
    ("Watchdog CPU:59 Hard LOCKUP", "bug", "hard-lockup"),
    (
        "BUG: sleeping function called from invalid context at kernel/locking/mutex.c:580",
        "bug",
        "atomic-sleep",
    ),
    ("BUG: scheduling while atomic: swapper/0/0/0x00000002", "bug", "atomic-sleep"),
    ("BUG: unable to handle page fault for address: ffffde4bdb12874b", "oops", "page-fault"),
    (
        "BUG: unable to handle kernel NULL pointer dereference at 0000000000000008",
        "oops",
        "page-fault",
    ),
    ("BUG: unable to handle kernel paging request at ffff88002bde1e40", "oops", "page-fault"),
    ("BUG: Kernel NULL pointer dereference on read at 0x00000000", "oops", "page-fault"),
    ("BUG: Unable to handle kernel data access on read at 0x6b6b6b6b6b6b6b73", "oops", "page-fault"),
    ("BUG: kernel NULL pointer dereference, address: 0000000000000008", "oops", "page-fault"),
    (
        "BUG: workqueue lockup - pool cpus=0 node=0 flags=0x0 nice=0 stuck for 31s!",
        "bug",
        "workqueue-lockup",
    ),
    ("BUG: Bad page state in process nginx  pfn:12345", "bug", "bug"),
    ("BUG: Bad rss-counter state mm:000000009a0e5f4d type:MM_ANONPAGES val:1", "bug", "bug"),
    ("BUG: using smp_processor_id() in preemptible [00000000] code: nginx/1234", "bug", "bug"),
    ("BUG: spinlock bad magic on CPU#0, swapper/0/1", "bug", "bug"),
    ("BUG kmalloc-128 (Not tainted): Redzone overwritten", "bug", "slab-corruption"),
    ("BUG kmalloc-64: Poison overwritten", "bug", "slab-corruption"),
    (
        "BUG kmalloc-256(0:354604dd) (Tainted: GF           E  ------------  ): Objects remaining",
        "bug",
        "slab-corruption",
    ),
    (
        "Slab corruption (Not tainted): kmalloc-64 start=ffff88003b7ba400, len=64",
        "bug",
        "slab-corruption",
    ),
    (
        "BUG skbuff_head_cache (Tainted: G    B      O     ): Poison overwritten",
        "bug",
        "slab-corruption",
    ),
    ("UBSAN: array-index-out-of-bounds in net/core/dev.c:1234:12", "bug", "ubsan"),
    ("UBSAN: shift-out-of-bounds in fs/ext4/super.c:4191:25", "bug", "ubsan"),
    ("UBSAN: Undefined behaviour in drivers/usb/core/devio.c:1517:25", "bug", "ubsan"),
    ("INFO: task kworker/0:1:123 blocked for more than 120 seconds.", "bug", "hung-task"),
    ("INFO: task CPU 0/KVM:4242 blocked for more than 122 seconds.", "bug", "hung-task"),
    ("INFO: task udevd:5612 blocked in I/O wait for more than 143 seconds.", "bug", "hung-task"),
    ("INFO: task syz-executor0:4026 can't die for more than 120 seconds.", "bug", "hung-task"),
    ("rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:", "bug", "rcu-stall"),
    ("rcu: INFO: rcu_preempt self-detected stall on CPU", "bug", "rcu-stall"),
    ("INFO: rcu_sched self-detected stall on CPU", "bug", "rcu-stall"),
    (
        "INFO: rcu_sched detected stalls on CPUs/tasks: { 2} (detected by 7, t=15002 jiffies)",
        "bug",
        "rcu-stall",
    ),
    (
        "rcu: INFO: rcu_preempt detected expedited stalls on CPUs/tasks: { 0-... } 6 jiffies s: 85 root: 0x1/.",
        "bug",
        "rcu-stall",
    ),
    ("INFO: rcu_tasks detected stalls on tasks:", "bug", "rcu-stall"),
    ("INFO: rcu_sched_state detected stall on CPU 0 (t=105060 jiffies)", "bug", "rcu-stall"),
    ("WARNING: CPU: 1 PID: 42 at net/core/dev.c:123 foo+0x1/0x2", "warning", "kernel-warning"),
    (
        "WARNING: CPU: 0 PID: 10 at /root/tempesta/fw/tls.c:294 tfw_tls_encrypt+0xaab/0xf00 [tempesta_fw]",
        "warning",
        "kernel-warning",
    ),
    ("WARNING: at net/ipv4/tcp.c:1234 tcp_close+0x1/0x2()", "warning", "kernel-warning"),
    (
        "WARNING: kernel/fork.c:123 at copy_process+0x1/0x2, CPU#1: swapper/0/1",
        "warning",
        "kernel-warning",
    ),
    (
        "WARNING: [time_after(jiffies, timeout)] io_uring/io_uring.c:3026 at "
        "io_ring_exit_work+0x44c/0xbc0, CPU#0: kworker/u8:0/10040",
        "warning",
        "kernel-warning",
    ),
    ("WARNING: possible circular locking dependency detected", "warning", "lockdep"),
    ("WARNING: possible recursive locking detected", "warning", "lockdep"),
    ("WARNING: inconsistent lock state", "warning", "lockdep"),
    ("WARNING: bad unlock balance detected!", "warning", "lockdep"),
    ("WARNING: HARDIRQ-safe -> HARDIRQ-unsafe lock order detected", "warning", "lockdep"),
    ("[ INFO: possible circular locking dependency detected ]", "warning", "lockdep"),
    ("[ INFO: possible recursive locking detected ]", "warning", "lockdep"),
    ("[ INFO: inconsistent lock state ]", "warning", "lockdep"),
    ("[ INFO: SOFTIRQ-safe -> SOFTIRQ-unsafe lock order detected ]", "warning", "lockdep"),
    ("INFO: possible circular locking dependency detected", "warning", "lockdep"),
    ("WARNING: possible irq lock inversion dependency detected", "warning", "lockdep"),
    ("WARNING: held lock freed!", "warning", "lockdep"),
    ("WARNING: lock held when returning to user space!", "warning", "lockdep"),
    ("WARNING: halt/675 still has locks held!", "warning", "lockdep"),
    ("WARNING: Nested lock was not taken", "warning", "lockdep"),
    ("WARNING: bad contention detected!", "warning", "lockdep"),
    ("[ BUG: bad unlock balance detected! ]", "bug", "lockdep-bug"),
    ("[ BUG: held lock freed! ]", "bug", "lockdep-bug"),
    ("[ BUG: lock held when returning to user space! ]", "bug", "lockdep-bug"),
    ("[ BUG: syz-executor/1234 still has locks held! ]", "bug", "lockdep-bug"),
    ("[ BUG: Invalid wait context ]", "bug", "lockdep-bug"),
    ("BUG: bad unlock balance detected!", "bug", "bug"),
    ("INFO: trying to register non-static key.", "warning", "non-static-key"),
    ("WARNING: suspicious RCU usage", "warning", "suspicious-rcu"),
    ("[ INFO: suspicious RCU usage. ]", "warning", "suspicious-rcu"),
    ("[ INFO: suspicious rcu_dereference_check() usage. ]", "warning", "suspicious-rcu"),
    (
        "WARNING: kernel stack regs at ffff8801c7a2f7a8 in syz-executor:3795 has bad 'bp' value"
        " ffff8801c7a2f8f0",
        "warning",
        "unwinder",
    ),
    (
        "WARNING: kernel stack frame pointer at ffff88003ef07e48 in swapper/1:0 has bad value"
        " 0000000000000000",
        "warning",
        "unwinder",
    ),
    ("WARNING test message", "warning", "test-message"),
    (
        "[tempesta fw] Warning: client 1.2.3.4 requested missing server name, reject connection",
        "warning",
        "tempesta-warning",
    ),
    (
        "[tempesta tls] Warning: [::ffff:192.168.122.128] TLS cannot decrypt msg on state Handshake"
        " Over, ret=-74(bad ciphertext)",
        "warning",
        "tempesta-warning",
    ),
    ("[tdb] Warning: cannot allocate new block", "warning", "tempesta-warning"),
    ("[tempesta fw] ERROR: cannot create the cache: -12", "error", "tempesta-error"),
    ("[tempesta tls] ERROR: cannot allocate a handshake context", "error", "tempesta-error"),
    ("[tempesta db] ERROR: cannot open the table", "error", "tempesta-error"),
    ("[tdb] ERROR: cannot open db for /opt/tempesta/db/cache.tdb", "error", "tempesta-error"),
    ("[tempesta] ERROR: don't know how to handle: 'frang_limits'", "error", "tempesta-error"),
    # CONFIG_PRINTK_CALLER: the caller's id follows the time stamp.
    (
        "[  T650] BUG: unable to handle page fault for address: ffff888058a67000",
        "oops",
        "page-fault",
    ),
    (
        "[    C0] BUG: workqueue lockup - pool cpus=2 node=0 flags=0x1 nice=0 stuck for 171s!",
        "bug",
        "workqueue-lockup",
    ),
    (
        "[   T31] INFO: task udevd:5612 blocked in I/O wait for more than 143 seconds.",
        "bug",
        "hung-task",
    ),
    # Blanks before the header, with or without a caller id.
    ("  BUG: using __this_cpu_read() in preemptible [00000000] code: syz/1", "bug", "bug"),
    ("\tkernel BUG at fs/ext4/inode.c:2700!", "bug", "kernel-bug"),
    ("[ T8053]  WARNING: CPU: 0 PID: 8053 at net/core/dev.c:1 f+0x1/0x2", "warning", "kernel-warning"),
    # The console merged another writer's unfinished line with a kernel line: the header
    # follows a time stamp inside the line.
    (
        "syzkaller login: [   16.305150] INFO: task syz-executor:3795 blocked for more than 143"
        " seconds.",
        "bug",
        "hung-task",
    ),
    (
        "** 5311 printk messages dropped ** [   60.130000] BUG: KASAN: use-after-free in"
        " ip6_dst_ifdown+0x3c/0x2d0",
        "bug",
        "kasan",
    ),
    (
        "Debian GNU/Linux 12 syzkaller ttyS0[   34.123456][ T5830] WARNING: CPU: 1 PID: 5830 at"
        " kernel/locking/lockdep.c:232 hlock_class+0x101/0x130",
        "warning",
        "kernel-warning",
    ),
]

# Lines of healthy machines and normal operation that must never start an incident.
NOT_INCIDENTS = [
    # Firmware noise of healthy boots.
    "ACPI Error: Aborting method \\_SB.PCI0.LPCB.H_EC.CHRG.PPSS due to previous error (AE_NOT_FOUND) (20200110/psparse-531)",
    "ACPI BIOS Error (bug): Could not resolve symbol [\\_SB.PCI0.GP17.AZAL], AE_NOT_FOUND (20220331/dswload2-162)",
    "ACPI Error: AE_NOT_FOUND, During name lookup/catalog (20220331/psobject-220)",
    "platform regulatory.0: Direct firmware load for regulatory.db failed with error -2",
    "cfg80211: failed to load regulatory.db",
    "RAS: Correctable Errors collector initialized.",
    'PCI: Using host bridge windows from ACPI; if necessary, use "pci=nocrs" and report a bug',
    "pci 0000:00:1f.5: can't claim BAR 0 [mem 0xfe010000-0xfe010fff]: no compatible bridge window",
    "ERST: Error Record Serialization Table (ERST) support is initialized.",
    "EDAC MC: Ver: 3.0.0",
    "EDAC MC0: 1 CE memory read error on CPU_SrcID#0_Ha#0_Chan#1_DIMM#0 (channel:1 slot:0 page:0x12345 offset:0x0 grain:32 syndrome:0x0)",
    "i8042: PNP: No PS/2 controller found.",
    "i8042: Can't read CTR while initializing i8042",
    "[Firmware Bug]: TSC doesn't count with P0 frequency!",
    "[Firmware Bug]: No valid trip found",
    "x86/cpu: User Mode Instruction Prevention (UMIP) activated",
    "MMIO Stale Data CPU bug present and SMT on, data leak possible. See https://www.kernel.org/doc/html/latest/admin-guide/hw-vuln/processor_mmio_stale_data.html for more details.",
    "Spectre V2 : Mitigation: Retpolines",
    "Spectre V2 : WARNING: Unprivileged eBPF is enabled with eIBRS on, data leaks possible via Spectre v2 BHB attacks!",
    "RETBleed: WARNING: Spectre v2 mitigation leaves CPU vulnerable to RETBleed attacks, data leaks possible!",
    "MDS: Vulnerable: Clear CPU buffers attempted, no microcode",
    "Kernel command line: BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro panic=10 spectre_v2=retpoline",
    "Kernel command line: console=ttyS0 panic=1 oops=panic quiet loglevel=8",
    "unchecked MSR access error: WRMSR to 0x38f (tried to write 0x0001000f0000003f) at rIP: 0xffffffff810c30bc (native_write_msr+0xc/0x30)",
    "intel-spi: probe of 0000:00:1f.5 failed with error -5",
    "i915 0000:00:02.0: [drm] *ERROR* GT1: GSC proxy handler failed to init",
    "nvme nvme0: missing or invalid SUBNQN field.",
    "EXT4-fs warning (device sda1): ext4_dx_add_entry:2461: Directory (ino: 1234) index full, reach max htree level :2",
    "Warning: unable to open an initial console.",
    # Lines that start with the word WARNING and are no kernel warning: user space on the
    # console (sshd, the dynamic loader), notices of kernel subsystems printed with pr_warn().
    "WARNING: /etc/ssh/moduli does not exist, using fixed modulus",
    "WARNING: Unsupported flag value(s) of 0x%x in DT_FLAGS_1.",
    "WARNING: The mand mount option has been deprecated and",
    "WARNING: fbcon: Driver 'vkmsdrmfb' missed to adjust virtual screen size (0x0 vs. 64x48)",
    "WARNING: workqueue cpumask: online intersect > possible intersect",
    "WARNING: kernel not compiled with CPU_SRSO.",
    "WARNING: See https://kernel.org/doc/html/latest/admin-guide/hw-vuln/srso.html for mitigation options.",
    "WARNING: Unprivileged eBPF is enabled with eIBRS on, data leaks possible via Spectre v2 BHB attacks!",
    "WARNING: CPU: 0 PID: 1 is not a warning without the word at",
    "WARNINGS: none",
    "XFS (sda1): WARNING: Reset corrupted AGFL on AG 0. 4 blocks leaked. Please unmount and run xfs_repair.",
    "INFO: lockdep is turned off.",
    "INFO: Stall ended before state dump start",
    "INFO: recovery required on readonly filesystem.",
    "kmemleak: 2 new suspected memory leaks (see /sys/kernel/debug/kmemleak)",
    "kmemleak: Kernel memory leak detector initialized (mem pool available: 15779)",
    "VFS: Mounted root (ext4 filesystem) readonly on device 8:1.",
    "  ? do_syscall_64+0x3a/0x90",
    "  #0: ffff888012345678 (&sb->s_type->i_mutex_key#10){+.+.}-{3:3}, at: path_openat+0x1/0x2",
    "[  T123] hello",
    "[   16.305150] an ordinary line with a time stamp left in it",
    "syzkaller login: [   16.305150] an ordinary line",
    # systemd and user space writing to the kernel log.
    "systemd[1]: Failed to start Load Kernel Modules.",
    "systemd[1]: Started Journal Service.",
    "systemd-journald[288]: Received client request to flush runtime journal.",
    'audit: type=1130 audit(1572480818.183:2): pid=1 uid=0 auid=4294967295 ses=4294967295 msg=\'unit=systemd-journald comm="systemd" exe="/usr/lib/systemd/systemd" hostname=? addr=? terminal=? res=success\'',
    "test-message",
    "after the warning",
    # User-space faults the kernel reports: not kernel incidents.
    "traps: nginx[1234] general protection fault ip:7f0c2c0b5e6e sp:7ffd3a1c9e80 error:0 in libc.so.6[7f0c2c028000+195000]",
    "nginx[1234]: segfault at 0 ip 000055d1c0a1b2c3 sp 00007ffd6e1e2f00 error 4 in nginx[55d1c0a00000+100000]",
    "traps: a.out[4242] trap divide error ip:401136 sp:7ffc8b9b9e40 error:0 in a.out[401000+1000]",
    "traps: a.out[4242] trap invalid opcode ip:401136 sp:7ffc8b9b9e40 error:0 in a.out[401000+1000]",
    # Parts of a trace, and lines about panics or watchdogs that are not one.
    "------------[ cut here ]------------",
    "---[ end trace 0000000000000000 ]---",
    "---[ end Kernel panic - not syncing: Fatal exception ]---",
    "Kernel Offset: 0x17800000 from 0xffffffff81000000 (relocation range: 0xffffffff80000000-0xffffffffbfffffff)",
    "Rebooting in 1 seconds..",
    "sysrq: Show backtrace of all active CPUs",
    "sysrq: HELP : loglevel(0-9) reboot(b) crash(c) terminate-all-tasks(e) memory-full-oom-kill(f)",
    "NMI watchdog: Enabled. Permanently consumes one hw-PMU counter.",
    "watchdog: Disabling watchdog on nohz_full cores by default",
    "INFO: NMI handler (nmi_cpu_backtrace_handler) took too long to run: 1.851 msecs",
    "[   T31] INFO: t",
    "rcu: Hierarchical RCU implementation.",
    '"echo 0 > /proc/sys/kernel/hung_task_timeout_secs" disables this message.',
    "kasan: CONFIG_KASAN_INLINE enabled",
    "kasan: GPF could be caused by NULL-ptr deref or user memory access",
    " dump_stack_lvl+0x44/0x5c",
    "RIP: 0010:tfw_cache_copy_resp.isra.0+0x6ab/0xbe0 [tempesta_fw]",
    # Resource pressure: left to extra patterns (docs/incidents.md).
    "Out of memory: Killed process 4242 (nginx) total-vm:1234kB, anon-rss:1234kB, file-rss:0kB, shmem-rss:0kB",
    "nginx invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE|__GFP_COMP), order=0, oom_score_adj=0",
    "ksoftirqd/0: page allocation failure: order:4, mode:0x40a20(GFP_ATOMIC|__GFP_COMP), nodemask=(null)",
    "mce: [Hardware Error]: Machine check events logged",
    "TCP: request_sock_TCP: Possible SYN flooding on port 443. Sending cookies.  Check SNMP counters.",
    "net_ratelimit: 42 callbacks suppressed",
    # Tempesta FW's information, its access log (the client's text comes after the address) and
    # the System Verification Script's report.
    "[tempesta fw] Tempesta FW is ready",
    "[tempesta fw] Initializing Tempesta FW kernel module...",
    "[tdb] Start Tempesta DB",
    '[tempesta fw] 127.0.0.1 "default" "GET /WARNING: CPU HTTP/1.1" 403 0 "-" "ERROR: x"',
    # A client's text with a time stamp and a header in it: what a client sends never starts
    # an incident, whichever path the line takes.
    '[tempesta fw] 1.2.3.4 "default" "GET /[ 1.000000] BUG: x HTTP/1.1" 403 0 "-" "-"',
    "[tempesta fw] Starting virtual host [ 1.000000] BUG: x",
    'audit: type=1400 audit(1.2:3): apparmor="DENIED" comm="[ 1.000000] BUG: x"',
    "[tempesta sc] Verification passed with errors!",
    "[tempesta sc] OS configuration or hardware is not suitable/ (Total 2 errors)",
    "[tempesta sc] \t1. Current loaded kernel is not suitable with TFW: 6.1.0-56-amd64",
    "[tempesta sc] ERROR: not a module's error",
    "[tempesta sc] Netconsole activated",
    "",
]


def corpus_file(path: str) -> tuple[dict[str, str], list[str]]:
    """A corpus file's header fields (source, expect, first) and its lines without time stamps."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    header: dict[str, str] = {}
    while lines and lines[0].startswith("#"):
        key, _, value = lines.pop(0)[2:].partition(": ")
        header.setdefault(key, value)
    return header, [line[PREFIX.match(line).end() :] for line in lines if line]


def incidents(rules: Rules, lines: list[str]) -> list[tuple[str, str, str]]:
    """(line, kind, rule) for every line that starts an incident."""
    found = []
    for line in lines:
        detection = rules.detect(line)
        if detection is not None:
            found.append((line, detection.kind, detection.rule))
    return found


def crash_files() -> list[str]:
    return sorted(glob.glob(os.path.join(CORPUS, "crash", "*.txt")))


def healthy_files() -> list[str]:
    return sorted(glob.glob(os.path.join(CORPUS, "healthy", "*.txt")))


# Every rule tried on every line, without the first-character dispatch: the reference the fast
# path must agree with. A header may start the line, follow blanks and caller ids, or follow a
# time stamp inside the line.
_NAIVE = re.compile("|".join(f"({pattern})" for _, _, _, pattern in RULES))
_LEAD = re.compile(LEAD)
_STAMP = re.compile(STAMP)
_TEMPESTA = re.compile(r"\[(?:tempesta(?: (?!sc\])[a-z0-9_]+)?|tdb)\] ")


def naive(text: str) -> tuple[str, str] | None:
    starts = [0]
    if lead := _LEAD.match(text):
        starts.append(lead.end())
    for stamp in _STAMP.finditer(text):
        before = text[: stamp.start()]
        if '"' not in before and not _TEMPESTA.match(before):
            starts.append(_LEAD.match(text, stamp.end()).end())
    for start in starts:
        m = _NAIVE.match(text, start)
        if m is not None:
            rule, kind, _, _ = RULES[m.lastindex - 1]
            return kind, rule
    return None


def header_at_start(text: str) -> bool:
    """True when the line's header is at its start or after caller ids: where the hot path's
    filter looks (not after leading blanks nor after a time stamp inside the line)."""
    start = find_header(text)[0]
    return start == 0 or (text[:1] == "[" and _LEAD.match(text).end() == start)


class RuleTests(unittest.TestCase):
    """Each rule on the lines it is for, and on the lines it must leave alone."""

    def test_examples(self):
        rules = Rules()
        wrong = [
            (text, kind, rule, rules.detect(text))
            for text, kind, rule in EXAMPLES
            if rules.detect(text) != Detection(kind, rule)
        ]
        self.assertEqual(wrong, [])

    def test_every_rule_has_an_example(self):
        self.assertEqual({rule for _, _, rule in EXAMPLES}, {rule for rule, _, _, _ in RULES})

    def test_not_incidents(self):
        rules = Rules()
        self.assertEqual([text for text in NOT_INCIDENTS if rules.detect(text) is not None], [])

    def test_kinds(self):
        self.assertEqual(KINDS, ("crash", "oops", "bug", "warning", "error"))
        self.assertEqual(KINDS, config.INCIDENT_KINDS)
        self.assertLessEqual({kind for _, kind, _, _ in RULES}, set(KINDS))
        self.assertEqual(len({rule for rule, _, _, _ in RULES}), len(RULES))

    def test_detection(self):
        detection = Rules().detect("WARNING test message")
        self.assertEqual(detection, Detection("warning", "test-message", False))
        self.assertFalse(detection.ends_trace)
        self.assertRaises(AttributeError, setattr, detection, "kind", "crash")

    def test_dispatch_agrees_with_every_rule_on_the_corpus(self):
        rules = Rules()
        paths = crash_files() + healthy_files()
        lines = [line for path in paths for line in corpus_file(path)[1]]
        lines += [text for text, _, _ in EXAMPLES] + NOT_INCIDENTS
        disagree = []
        for line in lines:
            detection = rules.detect(line)
            got = None if detection is None else (detection.kind, detection.rule)
            if got != naive(line):
                disagree.append((line, got, naive(line)))
        self.assertEqual(disagree, [])

    @given(st.text())
    def test_any_text(self, text):
        detection = Rules().detect(text)
        self.assertTrue(detection is None or detection.kind in KINDS)
        self.assertIsInstance(is_end_marker(text), bool)
        self.assertTrue(signature("bug", text).startswith("bug: "))

    @given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126)))
    def test_dispatch_agrees_with_every_rule(self, text):
        detection = Rules().detect(text)
        self.assertEqual(
            None if detection is None else (detection.kind, detection.rule), naive(text)
        )

    @given(st.sampled_from(EXAMPLES), st.text(max_size=40))
    def test_text_after_the_header_does_not_matter(self, example, tail):
        text, kind, rule = example
        self.assertEqual(Rules().detect(f"{text} {tail}"), Detection(kind, rule))

    def test_long_lines_are_cheap(self):
        # Patterns that backtrack quadratically would take seconds on 16 KiB lines.
        rules = Rules()
        lines = [
            "a, " * 5000,
            "INFO: task " + "x " * 8000,
            "[tempesta " + "a" * 16000,
            "W" + "ARNING: x" * 1800,
            " " * 16000,
            "\t " * 5000 + "x",
            "[  T1] " * 2000 + "x",
            "login: [   16.305150]" + " " * 16000 + "x",
            "[ 1.0] " * 2000,
        ]
        started = time.perf_counter()
        table = rules.line_filter
        for line in lines:
            rules.detect(line)
            signature("bug", line)
            passes_line_filter(table, line)
        self.assertLess(time.perf_counter() - started, 0.5)


def passes_line_filter(table, text: str) -> bool:
    raw = text.encode("ascii")
    if not raw:
        return True
    entry = table[raw[0]]
    return entry is not None and raw.find(entry[0]) >= 0 and entry[1].match(raw) is not None


class LineFilterTests(unittest.TestCase):
    """The hot path's byte-level filter never hides a line that starts an incident."""

    def test_every_detected_line_of_the_corpus_passes(self):
        rules = Rules()
        paths = crash_files() + healthy_files()
        lines = [line for path in paths for line in corpus_file(path)[1]]
        lines += [text for text, _, _ in EXAMPLES]
        detected = [line for line in lines if line.isascii() and rules.detect(line) is not None]
        self.assertGreater(len(detected), len(EXAMPLES))
        hidden = [
            line
            for line in detected
            if header_at_start(line) and not passes_line_filter(rules.line_filter, line)
        ]
        self.assertEqual(hidden, [])

    @given(
        st.sampled_from(["", "[  T123] ", "[    C1] ", "  ", "\t", "[ T12]  "]),
        st.sampled_from([text for text, _, _ in EXAMPLES] + [""]),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
    )
    def test_any_ascii_line_that_is_detected_passes(self, caller, example, tail):
        text = caller + example[: len(example) // 2] + tail
        # A header after a time stamp inside the line is the decoder's business (below); one
        # after leading blanks is not looked for on the hot path.
        assume(_STAMP.search(text) is None)
        rules = Rules()
        if rules.detect(text) is not None and header_at_start(text):
            self.assertTrue(passes_line_filter(rules.line_filter, text), text)

    def test_merged_lines_reach_the_observers(self):
        # A plain line that does not start with a time stamp but holds one is given whole to
        # the observers (the decoder's general path), as every line of a partial datagram is.
        seen = []
        registry = BufferRegistry(10, 100, 100_000)
        registry.observers.append(lambda instance, lines: seen.extend(l.text for l in lines))
        registry.line_filter = Rules().line_filter
        merged = [
            b"syzkaller login: [   16.305150] INFO: task syz:3795 blocked for more than 143 seconds.",
            b"** 5311 printk messages dropped ** [   60.130000] BUG: KASAN: use-after-free in f+0x1/0x2",
        ]
        for line in merged + [b"TCP: request_sock_TCP: Possible SYN flooding on port 443."]:
            registry.receive_datagram("192.0.2.1", line + b"\n", 1.0)
        registry.receive_datagram("192.0.2.1", b"[   61.000000] BUG: KASAN: x\n", 1.0)
        self.assertEqual(seen, [line.decode() for line in merged] + ["BUG: KASAN: x"])
        self.assertEqual(
            [Rules().detect(text).rule for text in seen], ["hung-task", "kasan", "kasan"]
        )
        self.assertEqual(
            signature("bug", seen[0]), "bug: INFO: task syz:N blocked for more than N seconds."
        )

    def test_lines_starting_with_blanks_are_filtered_out(self):
        # Call trace lines start with a blank; no netconsole record puts a header after one.
        table = Rules().line_filter
        for text in [" dump_stack_lvl+0x44/0x5c", "  ? tfw_http_req_process+0x1a/0x2b0", "\t#0: x"]:
            self.assertFalse(passes_line_filter(table, text), text)
        self.assertIsNone(table[ord(" ")])

    def test_ordinary_lines_are_filtered_out(self):
        table = Rules().line_filter
        for text in [
            "tfw_http_msg_process: [tempesta fw] request processed for client 192.0.2.77 status 200",
            "[tempesta fw] Starting virtual host 'default' listening on 0.0.0.0:443",
            "nf_conntrack: nf_conntrack: table full, dropping packet",
            "TCP: request_sock_TCP: Possible SYN flooding on port 443. Sending cookies.",
            " ? tfw_http_req_process+0x1a/0x2b0 [tempesta_fw]",
        ]:
            self.assertFalse(passes_line_filter(table, text), text)

    def test_extra_patterns_see_every_line(self):
        self.assertIsNone(Rules(extra=[("error", "oom-killer")]).line_filter)
        self.assertIsNotNone(Rules(ignore=["test"]).line_filter)


class EndMarkerTests(unittest.TestCase):
    """The line that closes a trace."""

    def test_end_markers(self):
        for text in (
            "---[ end trace 0000000000000000 ]---",
            "---[ end trace 5ad2a2b6b2d4e8c1 ]---",
            "---[ end Kernel panic - not syncing: Fatal exception ]---",
            "---[ end Kernel panic - not syncing: sysrq triggered crash ]---",
            "[  T650] ---[ end trace 0000000000000000 ]---",
        ):
            self.assertTrue(is_end_marker(text), text)

    def test_not_end_markers(self):
        for text in (
            "------------[ cut here ]------------",
            "end trace",
            "Kernel panic - not syncing: sysrq triggered crash",
            " ---[ end trace 0000000000000000 ]---",
            "",
        ):
            self.assertFalse(is_end_marker(text), text)

    def test_corpus_end_markers(self):
        markers = [
            line for path in crash_files() for line in corpus_file(path)[1] if is_end_marker(line)
        ]
        self.assertGreaterEqual(len(markers), 4)


class SignatureTests(unittest.TestCase):
    """Repeats of one incident share a signature; different call sites do not."""

    def test_same_warning_from_another_cpu_pid_address(self):
        one = signature("warning", "WARNING: CPU: 1 PID: 42 at net/core/dev.c:123 foo+0x1/0x2")
        other = signature("warning", "WARNING: CPU: 7 PID: 31337 at net/core/dev.c:123 foo+0x1/0x2")
        self.assertEqual(one, other)
        self.assertEqual(one, "warning: WARNING: CPU: N PID: N at net/core/dev.c:123 foo+0xX/0xX")

    def test_different_call_site(self):
        one = signature("warning", "WARNING: CPU: 1 PID: 42 at net/core/dev.c:123 foo+0x1/0x2")
        self.assertNotEqual(
            one, signature("warning", "WARNING: CPU: 1 PID: 42 at net/core/dev.c:124 foo+0x1/0x2")
        )
        self.assertNotEqual(
            one, signature("warning", "WARNING: CPU: 1 PID: 42 at net/core/sock.c:123 foo+0x1/0x2")
        )
        self.assertNotEqual(
            one, signature("warning", "WARNING: CPU: 1 PID: 42 at net/core/dev.c:123 bar+0x1/0x2")
        )

    def test_kind_is_part_of_it(self):
        text = "WARNING: CPU: 1 PID: 42 at net/core/dev.c:123 foo+0x1/0x2"
        self.assertNotEqual(signature("warning", text), signature("bug", text))

    def test_real_repeated_warning(self):
        # The Surface Pro 7 log: the same WARN_ON twice, the second with different time stamps.
        header, lines = corpus_file(os.path.join(CORPUS, "crash", "x86-i915-warning-surface.txt"))
        warnings = [(line, kind) for line, kind, _ in incidents(Rules(), lines)]
        self.assertEqual(len(warnings), 2)
        self.assertEqual(len({signature(kind, line) for line, kind in warnings}), 1)

    def test_lockup_from_another_cpu_and_task(self):
        self.assertEqual(
            signature("bug", "watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [nginx:1234]"),
            signature("bug", "watchdog: BUG: soft lockup - CPU#3 stuck for 26s! [kworker/3:1:99]"),
        )

    def test_caller_id_and_addresses(self):
        self.assertEqual(
            signature(
                "bug", "[  T650] BUG: unable to handle page fault for address: ffff888058a67000"
            ),
            signature(
                "bug", "[ T1234] BUG: unable to handle page fault for address: ffff88805ff01000"
            ),
        )

    def test_newer_warning_format(self):
        self.assertEqual(
            signature(
                "warning", "WARNING: kernel/fork.c:123 at copy_process+0x1/0x2, CPU#1: swapper/0/1"
            ),
            signature(
                "warning", "WARNING: kernel/fork.c:123 at copy_process+0x1/0x2, CPU#5: nginx/4242"
            ),
        )

    def test_tempesta_warning_from_other_clients(self):
        one = signature(
            "warning",
            "[tempesta fw] Warning: client 1.2.3.4 requested missing server name, reject connection",
        )
        other = signature(
            "warning",
            "[tempesta fw] Warning: client 10.20.30.40 requested missing server name, reject connection",
        )
        self.assertEqual(one, other)
        self.assertNotEqual(
            one, signature("warning", "[tempesta fw] Warning: pending active connections for 5s")
        )

    def test_identifiers_keep_their_digits(self):
        self.assertEqual(
            signature("bug", "BUG: KASAN: slab-out-of-bounds in sha256_update+0x16/0x30 [x86_64]"),
            "bug: BUG: KASAN: slab-out-of-bounds in sha256_update+0xX/0xX [x86_64]",
        )

    def test_bounded(self):
        self.assertLessEqual(len(signature("bug", "BUG: " + "x" * 100_000)), 600)


class ConfigPatternTests(unittest.TestCase):
    """incident_patterns add rules tried first; ignore_patterns win over every rule."""

    def test_ignore_wins_over_built_in_rules(self):
        rules = Rules(ignore=[r"test message"])
        self.assertIsNone(rules.detect("WARNING test message"))
        self.assertEqual(
            rules.detect("WARNING: suspicious RCU usage"), Detection("warning", "suspicious-rcu")
        )

    def test_ignore_wins_over_extra_patterns(self):
        rules = Rules(extra=[("error", r"table full")], ignore=[r"^nf_conntrack: "])
        self.assertIsNone(rules.detect("nf_conntrack: nf_conntrack: table full, dropping packet"))

    def test_extra_patterns_are_tried_first_and_searched(self):
        rules = Rules(
            extra=[("error", r"Out of memory: Killed"), ("crash", r"^WARNING test message$")]
        )
        self.assertEqual(
            rules.detect("Out of memory: Killed process 4242 (nginx)"),
            Detection("error", "extra-1"),
        )
        self.assertEqual(rules.detect("WARNING test message"), Detection("crash", "extra-2"))
        self.assertEqual(
            rules.detect("Kernel panic - not syncing: x"), Detection("crash", "kernel-panic")
        )

    def test_from_config(self):
        patterns = config.kind_of("incident_patterns").parse_json(
            [{"kind": "warning", "regex": "page allocation failure"}]
        )
        ignore = config.kind_of("ignore_patterns").parse_text(r"^\[tempesta fw\] Warning: client ")
        rules = Rules(patterns, ignore)
        self.assertEqual(
            rules.detect("ksoftirqd/0: page allocation failure: order:4, mode:0x40a20(GFP_ATOMIC)"),
            Detection("warning", "extra-1"),
        )
        self.assertIsNone(
            rules.detect("[tempesta fw] Warning: client 1.2.3.4 requested missing server name")
        )
        self.assertEqual(
            rules.detect("[tempesta fw] Warning: pending active connections for 5s"),
            Detection("warning", "tempesta-warning"),
        )

    def test_bad_kind(self):
        self.assertRaises(ValueError, Rules, [("fatal", "x")])

    def test_bad_regex(self):
        self.assertRaises(re.error, Rules, [("error", "(")])
        self.assertRaises(re.error, Rules, (), ["["])


class CorpusTests(unittest.TestCase):
    """The measured corpus: real crash logs are caught at the right line, healthy logs never."""

    def test_crash_files_first_incident(self):
        self.assertGreaterEqual(len(crash_files()), 25)
        wrong = []
        for path in crash_files():
            header, lines = corpus_file(path)
            self.assertIn(header.get("expect"), KINDS, path)
            self.assertTrue(header.get("source"), path)
            found = incidents(Rules(), lines)
            first = found[0][:2] if found else None
            if first != (header["first"], header["expect"]):
                wrong.append((os.path.basename(path), header["first"], header["expect"], first))
        self.assertEqual(wrong, [])

    def test_every_rule_fires_on_a_real_log(self):
        # Every built-in rule has a real log in the corpus (or, for the vendor's test line,
        # a real capture) where it finds an incident line.
        paths = crash_files() + [os.path.join(NETCONSOLE, "serial-console-boot.txt")]
        fired = {
            rule
            for path in paths
            for _, _, rule in incidents(Rules(), corpus_file(path)[1])
        }
        self.assertEqual({rule for rule, _, _, _ in RULES} - fired, set())

    def test_crash_corpus_covers_kinds_and_architectures(self):
        kinds = {corpus_file(path)[0]["expect"] for path in crash_files()}
        self.assertEqual(kinds, set(KINDS))
        names = [os.path.basename(path) for path in crash_files()]
        self.assertGreaterEqual(sum(name.startswith("x86-") for name in names), 10)
        self.assertGreaterEqual(sum(name.startswith("arm64-") for name in names), 10)

    def test_healthy_files_have_no_incident(self):
        paths = healthy_files()
        self.assertGreaterEqual(len(paths), 8)
        found = {}
        total = 0
        for path in paths:
            header, lines = corpus_file(path)
            self.assertTrue(header.get("source"), path)
            total += len(lines)
            hits = incidents(Rules(), lines)
            if hits:
                found[os.path.basename(path)] = hits
        self.assertEqual(found, {})
        self.assertGreaterEqual(total, 3000)

    def test_serial_console_boot(self):
        # A whole boot under QEMU, with the vendor's test line written to /dev/kmsg.
        _, lines = corpus_file(os.path.join(NETCONSOLE, "serial-console-boot.txt"))
        self.assertEqual(
            incidents(Rules(), lines), [("WARNING test message", "warning", "test-message")]
        )


class CaptureTests(unittest.TestCase):
    """Real netconsole captures, lines as the decoder gives them."""

    def test_sysrq_crash(self):
        for name in ("plain-sysrq-crash.txt", "extended-sysrq-crash.txt"):
            self.assertEqual(
                incidents(Rules(), expected_lines(name)),
                [
                    ("sysrq: Trigger a crash", "crash", "sysrq-crash"),
                    ("Kernel panic - not syncing: sysrq triggered crash", "crash", "kernel-panic"),
                ],
                name,
            )

    def test_boot_and_warning(self):
        for name in ("plain-boot-and-warning.txt", "extended-boot-and-warning.txt"):
            self.assertEqual(
                incidents(Rules(), expected_lines(name)),
                [("WARNING test message", "warning", "test-message")],
                name,
            )

    def test_fragmented(self):
        self.assertEqual(incidents(Rules(), expected_lines("extended-fragmented.txt")), [])
