"""Titles, guilty frames, modules and fingerprints, on real reports; and what reports carry."""

from __future__ import annotations

import glob
import os
import re
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.trial import unittest

from tempesta_ts.config import Config
from tempesta_ts.frames import MAX_FRAMES, Frame, first_trace, line_frames
from tempesta_ts.incidents import Rules
from tempesta_ts.netconsole import parse_plain_line
from tempesta_ts.pipeline import build_pipeline
from tempesta_ts.report import build_report
from tempesta_ts.titles import MAX_TITLE_CHARS, describe, fingerprint
from tests.captures import datagrams

TITLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "titles")
FINGERPRINT = re.compile(r"\A[0-9a-f]{16}\Z")


def read(name: str) -> tuple[dict[str, str], list[str]]:
    """A file of tests/data/titles: its ``# key: value`` headers and its lines as decoded."""
    headers, lines = {}, []
    with open(os.path.join(TITLES, name), encoding="utf-8") as f:
        for raw in f.read().split("\n"):
            if raw.startswith("# ") and ": " in raw and not lines:
                key, _, value = raw[2:].partition(": ")
                headers[key] = value
            elif raw or lines:
                lines.append(parse_plain_line(raw.encode(), 0.0).text)
    return headers, lines


def first_incident(lines: list[str]):
    """The description of the first incident the rules find, as a report would have it."""
    rules = Rules()
    for n, text in enumerate(lines):
        detection = rules.detect(text)
        if detection is not None:
            return describe(detection.kind, lines[n:])
    raise AssertionError("no incident")


class RealReportTests(unittest.TestCase):
    """tests/data/titles: real reports, each with the title syzbot gave it (``# title:``) or
    the one the convention gives it (``# expect:``), and its guilty module (``# module:``)."""

    def test_every_report_gets_its_title_and_module(self):
        wrong = []
        for path in sorted(glob.glob(os.path.join(TITLES, "*.txt"))):
            headers, lines = read(os.path.basename(path))
            want = headers.get("title") or headers["expect"]
            found = first_incident(lines)
            if (found.title, found.module) != (want, headers.get("module")):
                wrong.append((os.path.basename(path), found.title, found.module))
        self.assertEqual(wrong, [])

    def test_the_reports_cover_each_kind_of_title(self):
        titles = [read(os.path.basename(p))[0] for p in glob.glob(os.path.join(TITLES, "*.txt"))]
        kinds = Counter((h.get("title") or h["expect"]).split(" in ")[0] for h in titles)
        for kind in ("KASAN: use-after-free Read", "WARNING", "possible deadlock", "INFO: task hung",
                     "general protection fault", "BUG: unable to handle kernel NULL pointer dereference",
                     "kernel BUG", "KMSAN: uninit-value"):
            self.assertIn(kind, kinds)

    def test_kasan_in_a_tempesta_module_names_it(self):
        _, lines = read("tempesta-2169-kasan-tls-conn-send.txt")
        found = first_incident(lines)
        self.assertEqual(found.title, "KASAN: use-after-free Read in tfw_tls_conn_send")
        self.assertEqual(found.module, "tempesta_fw")
        # The unreliable frames are not in the trace: it is the callers, innermost first.
        self.assertEqual([f.function for f in found.frames],
                         ["dump_stack", "print_address_description.constprop.0", "kasan_report.cold",
                          "tfw_tls_conn_send", "tfw_cli_conn_send"])
        self.assertEqual(found.frames[3], Frame("tfw_tls_conn_send", "0x66", "0xe0", "tempesta_fw"))

    def test_warning_names_the_function_on_the_rip_line(self):
        found = first_incident(read("mptcp-620-warning-new-format.txt")[1])
        self.assertEqual(found.title, "WARNING in mptcp_pm_alloc_anno_list")
        self.assertEqual(found.frames, (Frame("mptcp_pm_alloc_anno_list", "0x1ee", "0x200"),))

    def test_warning_with_panic_on_warn_skips_the_panic_and_the_bug_helpers(self):
        found = first_incident(read("mptcp-13-warning-panic-on-warn.txt")[1])
        self.assertEqual(found.title, "WARNING in mptcp_incoming_options")

    def test_lockdep_deadlock_names_the_lock_being_taken(self):
        self.assertEqual(first_incident(read("mptcp-407-circular-locking.txt")[1]).title,
                         "possible deadlock in inet_sk_diag_fill")
        old = first_incident(read("tempesta-61-recursive-locking-old.txt")[1])
        self.assertEqual((old.title, old.module), ("possible deadlock in ss_send", "sync_socket"))

    def test_hung_task_skips_scheduling_and_waiting(self):
        found = first_incident(read("mptcp-463-task-hung.txt")[1])
        self.assertEqual(found.title, "INFO: task hung in lock_sock_nested")
        self.assertEqual(found.frames[0].function, "__schedule")

    def test_kernel_bug_at_a_tempesta_line_names_the_tempesta_function(self):
        found = first_incident(read("tempesta-2051-kernel-bug-apm.txt")[1])
        self.assertEqual((found.title, found.module), ("kernel BUG in tfw_apm_update_global", "tempesta_fw"))
        self.assertEqual(found.frames[0], Frame("tfw_apm_update_global", "0x37", "0x50", "tempesta_fw"))

    def test_general_protection_fault_and_null_dereference_name_the_faulting_function(self):
        self.assertEqual(first_incident(read("syzbot-gpf-dev-flush.txt")[1]).title,
                         "general protection fault in __dev_flush")
        self.assertEqual(first_incident(read("mptcp-155-null-deref.txt")[1]).title,
                         "BUG: unable to handle kernel NULL pointer dereference in mptcp_subflow_get_send")

    def test_old_arm_warning_takes_its_frames_without_a_call_trace_line(self):
        found = first_incident(read("raspberrypi-1088-arm32-warning-old-format.txt")[1])
        self.assertEqual((found.title, found.module), ("WARNING in ieee80211_add_station", "mac80211"))
        self.assertEqual([f.function for f in found.frames], ["unwind_backtrace", "show_stack", "dump_stack"])


class TitleTests(unittest.TestCase):
    """Shapes of reports, in the formats the kernel prints them."""

    def test_sysrq_crash_is_named_by_its_panic(self):
        text = b"".join(datagrams("plain-sysrq-crash.txt")).decode()
        lines = [parse_plain_line(raw.encode(), 0.0).text for raw in text.split("\n") if raw]
        start = lines.index("sysrq: Trigger a crash")
        found = describe("crash", lines[start:])
        self.assertEqual(found.title, "kernel panic: sysrq triggered crash")
        self.assertIsNone(found.module)
        # The user-space "RIP: 0033:0x47b7a0" after the trace is no frame.
        self.assertEqual([f.function for f in found.frames][:4],
                         ["dump_stack_lvl", "panic", "sysrq_handle_crash", "__handle_sysrq.cold"])
        self.assertEqual(found.frames[-1].function, "entry_SYSCALL_64_after_hwframe")

    def test_rcu_stall_names_the_function_above_the_entry_point(self):
        # Linux 6.x's self-detected stall (kernel/rcu/tree_stall.h, arch/x86 dumpstack), with
        # the Tempesta FW frames of tempesta-tech/tempesta#2564.
        lines = """rcu: INFO: rcu_preempt self-detected stall on CPU
rcu: \t2-....: (20999 ticks this GP) idle=0b4c/1/0x4000000000000000 softirq=1316/1316 fqs=5250
rcu: \t(t=21002 jiffies g=104157 q=1466 ncpus=4)
CPU: 2 PID: 27 Comm: ksoftirqd/2 Tainted: G           OE      6.12.12+ #65
Hardware name: QEMU Standard PC (Q35 + ICH9, 2009), BIOS 1.16.2-debian-1.16.2-1 04/01/2014
Call Trace:
 <IRQ>
 rcu_dump_cpu_stacks+0x1c8/0x270
 rcu_sched_clock_irq+0x6d3/0x1380
 update_process_times+0xb7/0x110
 tick_nohz_handler+0x164/0x200
 __hrtimer_run_queues+0x2b1/0x4d0
 hrtimer_interrupt+0x1b2/0x380
 __sysvec_apic_timer_interrupt+0x8e/0x1e0
 sysvec_apic_timer_interrupt+0x6d/0x80
 </IRQ>
 <TASK>
 asm_sysvec_apic_timer_interrupt+0x1a/0x20
RIP: 0010:ss_skb_chop_head_tail+0x29f/0x340 [tempesta_fw]
Code: 48 8b 45 d0 e8 5c 8a ff ff 85 c0 75 0c <48> 8b 5b 08 48 39 dd 75 e5
RSP: 0018:ffffc9000012f8a8 EFLAGS: 00000246
 ? ss_skb_chop_head_tail+0x29f/0x340 [tempesta_fw]
 tfw_connection_recv+0x115/0x220 [tempesta_fw]
 tfw_tls_connection_recv+0x2ce/0x640 [tempesta_fw]
 ss_tcp_process_skb.constprop.0+0x2ac/0x5b0 [tempesta_fw]
 ss_tcp_process_data+0x1ff/0x3b0 [tempesta_fw]
 ss_tcp_data_ready+0x96/0x1b0 [tempesta_fw]
 tcp_rcv_established+0xaba/0xc40
 tcp_v4_do_rcv+0x274/0x430
 tcp_v4_rcv+0x1938/0x1d30
 ip_protocol_deliver_rcu+0x45/0x4d0
 ip_local_deliver_finish+0xfb/0x130
 ip_local_deliver+0xfc/0x1e0
 ip_rcv+0x24c/0x270
 __netif_receive_skb_one_core+0x11c/0x130
 process_backlog+0x6e/0x220
 </TASK>""".split("\n")
        found = describe("bug", lines)
        # The stack loops somewhere under ip_rcv; the entry point names it (syzkaller's rule).
        self.assertEqual(found.title, "INFO: rcu detected stall in ip_rcv")
        self.assertEqual(found.frames[0].function, "rcu_dump_cpu_stacks")
        self.assertEqual(found.frames[9], Frame("ss_skb_chop_head_tail", "0x29f", "0x340", "tempesta_fw"))

    def test_soft_lockup_names_the_function_above_the_entry_point(self):
        lines = """watchdog: BUG: soft lockup - CPU#3 stuck for 22s! [ksoftirqd/3:30]
Modules linked in: tempesta_fw(O) tempesta_db(O) tempesta_tls(O) tempesta_lib(O)
CPU: 3 PID: 30 Comm: ksoftirqd/3 Tainted: G           O L    5.10.35+ #1
RIP: 0010:tfw_cache_h2_copy_chunked_body+0x1c2/0x2e0 [tempesta_fw]
Call Trace:
 tfw_cache_build_resp+0x4a1/0x7c0 [tempesta_fw]
 tfw_cache_process+0x2d8/0x3a0 [tempesta_fw]
 tfw_http_req_process+0x61c/0x1050 [tempesta_fw]
 tfw_connection_recv+0x115/0x220 [tempesta_fw]
 ss_tcp_data_ready+0x96/0x1b0 [tempesta_fw]
 tcp_rcv_established+0xaba/0xc40
 tcp_v4_rcv+0x1938/0x1d30
 net_rx_action+0x287/0x6b0
 __do_softirq+0xfe/0x383
 run_ksoftirqd+0x2b/0x40
 smpboot_thread_fn+0x110/0x1e0
 kthread+0x11b/0x140
 ret_from_fork+0x22/0x30""".split("\n")
        found = describe("bug", lines)
        self.assertEqual(found.title, "BUG: soft lockup in net_rx_action")
        self.assertIsNone(found.module)

    def test_warning_before_linux_3_13_with_only_unreliable_frames_names_its_header(self):
        # "WARNING: at %s:%d %pS()" (kernel/panic.c before 3.13), old x86 frames.
        lines = """WARNING: at net/core/dev.c:1915 skb_warn_bad_offload+0x99/0xb0() (Not tainted)
Modules linked in: bridge stp llc ipv6 virtio_net
Pid: 0, comm: swapper Not tainted 2.6.32-431.el6.x86_64 #1
Call Trace:
 <IRQ>  [<ffffffff81071e27>] ? warn_slowpath_common+0x87/0xc0
 [<ffffffff81071f16>] ? warn_slowpath_fmt+0x46/0x50
 [<ffffffff8145aca9>] ? skb_warn_bad_offload+0x99/0xb0
---[ end trace 6b19f2e2a8b0e5f9 ]---""".split("\n")
        found = describe("warning", lines)
        self.assertEqual(found.title, "WARNING in skb_warn_bad_offload")
        self.assertEqual(found.frames, ())

    def test_tempesta_error_keeps_its_text_with_numbers_masked(self):
        found = describe("error", ["[tempesta fw] ERROR: can't listen on front-end socket sk=00000000c8a3e0f1 (-98)"])
        self.assertEqual(found.title, "[tempesta fw] ERROR: can't listen on front-end socket sk=ADDR (-NUM)")
        self.assertEqual((found.module, found.frames), ("tempesta_fw", ()))
        found = describe("warning", ["[tempesta tls] Warning: [::ffff:10.0.0.2] TLS cannot decrypt msg "
                                     "on state Handshake Over, ret=-74(bad ciphertext)"])
        self.assertEqual(found.title, "[tempesta tls] Warning: [::ffff:IP] TLS cannot decrypt msg on state "
                                      "Handshake Over, ret=-NUM(bad ciphertext)")
        self.assertEqual(found.module, "tempesta_tls")
        self.assertEqual(describe("error", ["[tdb] ERROR: cannot open db file"]).module, "tempesta_db")
        self.assertEqual(describe("error", ["[tempesta] ERROR: configuration parsing error:"]).module,
                         "tempesta_fw")

    def test_a_line_no_format_knows_keeps_its_text_without_cpu_or_taint(self):
        self.assertEqual(describe("oops", ["SError Interrupt on CPU3, code 0xbe000011 -- SError"]).title,
                         "SError Interrupt on CPU, code ADDR -- SError")
        for taint in ("Not tainted", "Tainted: G    B      O   "):
            self.assertEqual(describe("bug", [f"BUG kmalloc-128 ({taint}): Redzone overwritten"]).title,
                             "BUG kmalloc-NUM: Redzone overwritten")

    def test_vendor_test_message_is_its_own_title(self):
        found = describe("warning", ["WARNING test message", "after the warning"])
        self.assertEqual((found.title, found.module, found.frames), ("WARNING test message", None, ()))

    def test_another_tasks_lines_are_not_this_report(self):
        # CONFIG_PRINTK_CALLER: a KASAN report of task 1533 is interleaved with task 1560's fault.
        lines = """[ T1560] general protection fault: 0000 [#1] PREEMPT SMP KASAN
[ T1533] BUG: KASAN: null-ptr-deref in refcount_sub_and_test_checked+0x87/0x200
[ T1560] RIP: 0010:refcount_sub_and_test_checked+0x8e/0x200
[ T1533] Call Trace:
[ T1533]  dump_stack+0x172/0x1f0
[ T1560] Call Trace:
[ T1533]  kasan_report+0x12/0x20
[ T1560]  refcount_dec_and_test_checked+0x1b/0x20
[ T1533]  refcount_sub_and_test_checked+0x87/0x200
[ T1560]  x25_connect+0x8d8/0xea0
[ T1533]  refcount_dec_and_test_checked+0x1b/0x20
[ T1560]  __sys_connect+0x264/0x330""".split("\n")
        found = describe("oops", lines)
        self.assertEqual(found.title, "general protection fault in x25_connect")
        self.assertEqual([f.function for f in found.frames],
                         ["refcount_sub_and_test_checked", "refcount_dec_and_test_checked", "x25_connect",
                          "__sys_connect"])

    def test_the_next_report_ends_the_window(self):
        lines = """WARNING: CPU: 0 PID: 1 at net/core/dev.c:3216 skb_warn_bad_offload+0x99/0xb0
BUG: kernel NULL pointer dereference, address: 0000000000000008
RIP: 0010:tcp_gso_segment+0x1e/0x4c0
Call Trace:
 inet_gso_segment+0x15c/0x3e0""".split("\n")
        found = describe("warning", lines)
        self.assertEqual((found.title, found.frames), ("WARNING in skb_warn_bad_offload", ()))

    def test_a_trace_that_never_came_is_corrupted(self):
        found = describe("bug", ["BUG: sleeping function called from invalid context at mm/slab.h:494"])
        self.assertEqual(found.title, "BUG: sleeping function called from invalid context in corrupted")


class FrameTests(unittest.TestCase):
    """Frames as each architecture and era prints them."""

    def test_frame_shapes(self):
        cases = [
            (" tfw_http_resp_fwd+0x2a1/0x2c0 [tempesta_fw]", [Frame("tfw_http_resp_fwd", "0x2a1", "0x2c0", "tempesta_fw")]),
            (" tcp_sendmsg+0x1/0x2", [Frame("tcp_sendmsg", "0x1", "0x2")]),
            (" [<ffffffff81234567>] foo.isra.0+0x1/0x2", [Frame("foo.isra.0", "0x1", "0x2")]),
            (" ttls_hs_done+0x16/0x30 [tempesta_tls 5a4b3c2d1e0f]", [Frame("ttls_hs_done", "0x16", "0x30", "tempesta_tls")]),
            (" __switch_to+0x2b0/0x6e0 (T)", [Frame("__switch_to", "0x2b0", "0x6e0")]),
            ("[<c010cb2c>] (unwind_backtrace) from [<c0109ef8>] (show_stack+0x10/0x14)",
             [Frame("unwind_backtrace"), Frame("show_stack", "0x10", "0x14")]),
            (" dump_stack_lvl+0x125/0x18f lib/dump_stack.c:106", [Frame("dump_stack_lvl", "0x125", "0x18f")]),
            (" __dump_stack lib/dump_stack.c:88 [inline]", []),
            ("Rebooting in 1 seconds..", []),
        ]
        for text, frames in cases:
            self.assertEqual(line_frames(text), frames, text)

    def test_the_faulting_function_comes_first_and_unreliable_frames_are_left_out(self):
        frames = first_trace([
            "BUG: unable to handle kernel NULL pointer dereference at 0000000000000008",
            "RIP: 0010:[<ffffffff82d4e304>]  [<ffffffff82d4e304>] tfw_sock_clnt_new+0x24/0x30 [tempesta_fw]",
            "Call Trace:",
            " [<ffffffff81641e2a>] ? warn_slowpath_null+0x1a/0x20",
            " [<ffffffff81641f00>] ss_tcp_state_change+0x196/0x740 [tempesta_fw]",
        ])
        self.assertEqual(frames, [Frame("tfw_sock_clnt_new", "0x24", "0x30", "tempesta_fw"),
                                  Frame("ss_tcp_state_change", "0x196", "0x740", "tempesta_fw")])

    def test_at_most_32_frames_of_the_first_trace(self):
        lines = ["WARNING: CPU: 0 PID: 1 at a.c:1 f+0x1/0x2", "Call Trace:"]
        lines += [f" f{n}+0x1/0x2" for n in range(40)]
        lines += ["Call Trace:", " other+0x1/0x2"]
        frames = first_trace(lines)
        self.assertEqual(len(frames), MAX_FRAMES)
        self.assertEqual(frames[-1].function, "f31")

    def test_registers_and_context_tags_do_not_end_the_trace(self):
        frames = first_trace(["Call Trace:", " <IRQ>", " a+0x1/0x2", " </IRQ>", " <TASK>",
                              "RIP: 0010:b+0x1/0x2", "RSP: 0018:ffffc90000da8c50 EFLAGS: 00010046",
                              " c+0x1/0x2", " </TASK>", "Kernel Offset: disabled", " d+0x1/0x2"])
        self.assertEqual([f.function for f in frames], ["a", "b", "c"])


class PropertyTests(unittest.TestCase):
    """What holds for any input."""

    @given(cpu=st.integers(0, 4095), pid=st.integers(1, 4194304), line=st.integers(1, 99999),
           offset=st.integers(0, 0xFFFF), stamp=st.integers(0, 10**6))
    def test_a_title_holds_no_cpu_pid_address_or_time(self, cpu, pid, line, offset, stamp):
        lines = [f"[{stamp:6d}.000001] WARNING: CPU: {cpu} PID: {pid} at net/core/dev.c:{line} "
                 f"dev_xmit+{offset:#x}/0x200", f"[{stamp:6d}.000002] RIP: 0010:dev_xmit+{offset:#x}/0x200"]
        title = describe("warning", lines).title
        self.assertEqual(title, "WARNING in dev_xmit")

    @given(st.lists(st.text(max_size=300), min_size=1, max_size=30))
    def test_any_window_gets_a_short_title(self, lines):
        found = describe("bug", lines)
        self.assertLessEqual(len(found.title), MAX_TITLE_CHARS)
        self.assertRegex(found.fingerprint, FINGERPRINT)

    def test_fingerprint_is_sixteen_hex_digits_of_kind_and_title(self):
        self.assertRegex(fingerprint("warning", "WARNING in foo"), FINGERPRINT)
        self.assertEqual(fingerprint("warning", "WARNING in foo"), fingerprint("warning", "WARNING in foo"))
        self.assertNotEqual(fingerprint("warning", "WARNING in foo"), fingerprint("bug", "WARNING in foo"))
        self.assertNotEqual(fingerprint("warning", "WARNING in foo"), fingerprint("warning", "WARNING in bar"))
        a = describe("warning", ["WARNING: CPU: 1 PID: 2 at a.c:3 foo+0x1/0x2"])
        b = describe("warning", ["WARNING: CPU: 7 PID: 99 at a.c:3 foo+0x5/0x2"])
        self.assertEqual(a.fingerprint, b.fingerprint)


class ReportTitleTests(unittest.TestCase):
    """Reports made from real datagrams carry title, module, frames and fingerprint."""

    def setUp(self):
        self.clock = task.Clock()
        self.stats = Counter()
        self.reports = []
        config = Config(max_instances=10, buffer_max_lines=10_000, buffer_max_bytes=10_000_000,
                        settle_seconds=5.0, cooldown_seconds=300.0)
        # The case is the report sink: submit() keeps each report.
        self.registry = build_pipeline(config, self.clock, self.stats, [self],
                                       make_report=self.make_report).registry

    def make_report(self, instance, incidents, suppressed, trigger=None):
        return build_report(instance=instance, incidents=incidents, suppressed=suppressed, client_id="c",
                            hostname="ts", version="0", now=self.clock.seconds(), trigger=trigger)

    def submit(self, report):
        self.reports.append(report)
        return defer.succeed(report)

    def send(self, grams):
        for gram in grams:
            self.registry.receive_datagram("192.0.2.10", gram, self.clock.seconds())
        self.clock.advance(5)
        (report,) = self.reports
        return report["incidents"]

    def assertDescribed(self, incident):
        self.assertRegex(incident["fingerprint"], FINGERPRINT)
        self.assertEqual(incident["fingerprint"], fingerprint(incident["kind"], incident["title"]))
        for frame in incident["frames"]:
            self.assertEqual(set(frame), {"function", "offset", "size", "module"})

    def test_vendor_test_line_written_to_dev_kmsg(self):
        (incident,) = self.send(datagrams("plain-boot-and-warning.txt"))
        self.assertEqual((incident["title"], incident["module"], incident["frames"]),
                         ("WARNING test message", None, []))
        self.assertDescribed(incident)

    def test_tempesta_error(self):
        (incident,) = self.send([b"[  812.004522] [tempesta fw] ERROR: can't listen on front-end socket "
                                 b"sk=00000000c8a3e0f1 (-98)\n"])
        self.assertEqual(incident["kind"], "error")
        self.assertEqual(incident["title"], "[tempesta fw] ERROR: can't listen on front-end socket sk=ADDR (-NUM)")
        self.assertEqual((incident["module"], incident["frames"]), ("tempesta_fw", []))
        self.assertDescribed(incident)

    def test_real_kernel_panic_capture(self):
        incidents = self.send(datagrams("extended-sysrq-crash.txt"))
        self.assertEqual([i["line"] for i in incidents][:2],
                         ["sysrq: Trigger a crash", "Kernel panic - not syncing: sysrq triggered crash"])
        for incident in incidents[:2]:
            self.assertEqual(incident["title"], "kernel panic: sysrq triggered crash")
            self.assertIsNone(incident["module"])
            self.assertEqual(incident["frames"][2],
                             {"function": "sysrq_handle_crash", "offset": "0x16", "size": "0x20", "module": None})
            self.assertDescribed(incident)

    def test_fragmented_kasan_report(self):
        # tempesta-tech/tempesta#2169 sent as extended netconsole messages; the report's
        # "Modules linked in:" line is over 1000 bytes, so netconsole sends it in fragments.
        _, lines = read("tempesta-2169-kasan-tls-conn-send.txt")
        modules = "Modules linked in: " + " ".join(f"tempesta_mod{n}(O)" for n in range(70))
        lines.insert(3, modules)
        grams = []
        for seq, text in enumerate(lines, 100):
            body = text.encode() + b"\n"
            if len(body) <= 1000:
                grams.append(b"4,%d,%d,-;%s" % (seq, 3430520348 + seq, body))
                continue
            for offset in range(0, len(body), 900):
                grams.append(b"4,%d,%d,-,ncfrag=%d/%d;%s" % (seq, 3430520348 + seq, offset, len(body),
                                                              body[offset : offset + 900]))
        self.assertGreater(sum(b"ncfrag=" in g for g in grams), 1)
        (incident,) = self.send(grams)
        self.assertEqual(incident["title"], "KASAN: use-after-free Read in tfw_tls_conn_send")
        self.assertEqual(incident["module"], "tempesta_fw")
        self.assertEqual(incident["frames"][3],
                         {"function": "tfw_tls_conn_send", "offset": "0x66", "size": "0xe0", "module": "tempesta_fw"})
        self.assertDescribed(incident)
        self.assertIn(modules, [e["text"] for e in self.reports[0]["log"]])
        self.assertGreater(self.stats["fragments_received"], 1)
