"""Many datagrams with one system call: Linux's recvmmsg(2), through ctypes.

Python's socket module reads one datagram a call. Reading up to 64 a call saves the system
call's entry and exit for all but one, and recvfrom's allocation of a 64 KiB bytes object
for each, which it then shrinks (docs/performance.md has the figures). Where the C library
has no recvmmsg, `BatchReader.available()` is False and the caller reads with recvfrom.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import sys

#: Datagrams one call can return.
SLOTS = 64
#: Room for the largest UDP datagram, so that none is ever cut: only the pages a datagram
#: touches become resident (a 64 KiB slot holding a 120-byte line costs one page).
SLOT_BYTES = 65536
# struct sockaddr_storage: room for any address.
_NAME_BYTES = 128
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_IoVec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def _libc_recvmmsg():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.recvmmsg
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int, ctypes.POINTER(_MMsgHdr), ctypes.c_uint, ctypes.c_int, ctypes.c_void_p
    ]
    function.restype = ctypes.c_int
    return function


_RECVMMSG = _libc_recvmmsg()


class BatchReader:
    """Reads up to SLOTS datagrams of one socket per system call, as recvfrom would give them."""

    def __init__(self, sock: socket.socket, slots: int = SLOTS) -> None:
        self.fd = sock.fileno()
        self.slots = slots
        # Anonymous memory: zero pages the kernel fills in on first touch. Slicing an mmap
        # gives bytes in one step (a memoryview would need a second).
        self._data = mmap.mmap(-1, slots * SLOT_BYTES)
        self._names = mmap.mmap(-1, slots * _NAME_BYTES)
        self._iovecs = (_IoVec * slots)()
        self._messages = (_MMsgHdr * slots)()
        # Held for as long as the kernel may write there: the maps stay where they are.
        self._exports = tuple(ctypes.c_char.from_buffer(m) for m in (self._data, self._names))
        data_at, names_at = (ctypes.addressof(export) for export in self._exports)
        for i in range(slots):
            self._iovecs[i].iov_base = data_at + i * SLOT_BYTES
            self._iovecs[i].iov_len = SLOT_BYTES
            header = self._messages[i].msg_hdr
            header.msg_name = names_at + i * _NAME_BYTES
            # The kernel writes back the address's own length; a socket's family does not
            # change, so the room left fits every later datagram too.
            header.msg_namelen = _NAME_BYTES
            header.msg_iov = ctypes.pointer(self._iovecs[i])
            header.msg_iovlen = 1
        # msg_len read straight from the array, as 32-bit words.
        words = memoryview(self._messages).cast("B").cast("I")
        stride = ctypes.sizeof(_MMsgHdr) // 4
        self._words = words
        self._len_at = [i * stride + _MMsgHdr.msg_len.offset // 4 for i in range(slots)]
        # What the kernel writes for an address of the socket's family (sockaddr_in or
        # sockaddr_in6); it is the same for every datagram.
        self._name_bytes = 16 if sock.family == socket.AF_INET else 28
        #: Source addresses as recvfrom gives them, by their raw bytes (bounded).
        self._addresses: dict[bytes, tuple] = {}

    @staticmethod
    def available() -> bool:
        """Whether this C library has recvmmsg."""
        return _RECVMMSG is not None

    def read(self, append) -> int:
        """Append (datagram, address) pairs for what is queued now; return how many.

        Raises OSError as recvfrom would (EAGAIN once nothing is queued).
        """
        count = _RECVMMSG(self.fd, self._messages, self.slots, _MSG_DONTWAIT, None)
        if count < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        data, names, words = self._data, self._names, self._words
        addresses, len_at, name_bytes = self._addresses, self._len_at, self._name_bytes
        for i in range(count):
            at = i * _NAME_BYTES
            raw = names[at : at + name_bytes]
            address = addresses.get(raw)
            if address is None:
                address = self._address(raw)
            at = i * SLOT_BYTES
            append((data[at : at + words[len_at[i]]], address))
        return count

    def _address(self, raw: bytes) -> tuple:
        if len(self._addresses) >= 65536:
            self._addresses.clear()
        family = int.from_bytes(raw[:2], sys.byteorder)
        port = int.from_bytes(raw[2:4], "big")
        if family == socket.AF_INET:
            address = (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
        else:
            # As recvfrom gives an IPv6 source: host, port, flow info, scope id; a scoped
            # (link-local) host is named with its interface, "fe80::1%eth0".
            host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
            flow = int.from_bytes(raw[4:8], "big")
            scope = int.from_bytes(raw[24:28], sys.byteorder)
            if scope:
                host = socket.getnameinfo((host, port, flow, scope), socket.NI_NUMERICHOST)[0]
            address = (host, port, flow, scope)
        self._addresses[raw] = address
        return address
