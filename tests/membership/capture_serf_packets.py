"""Regenerate tests/membership/fixtures/serf_*.json from real ``serf agent`` processes.

Run: ``.venv/bin/python tests/membership/capture_serf_packets.py`` (needs ``/usr/bin/serf``;
takes about a minute). Loopback only: serf agents on 127.0.0.21 and 127.0.0.22, and a
fake member on 127.0.0.23:7946 that speaks memberlist through imgproxy's own codec. The
fake member records every byte serf sends it, over UDP and TCP, answers pings and push-
pulls, and talks to serf first too (ping, stream ping, push-pull, indirect ping).

Scenario, once in plaintext and once with ``-encrypt`` (the key is in the fixture):
agent ``a`` starts with ``-tag role=worker -tag http=8080`` and joins the fake member;
agent ``b`` (role gateway) joins ``a``, then is killed with SIGKILL so that ``a`` asks the
fake member for indirect pings and gossips suspect and dead; finally ``a`` leaves.
Every serf process started here is killed on the way out, also on failure.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from imgproxy.membership.keyring import Keyring  # noqa: E402
from imgproxy.membership.messages import (  # noqa: E402
    AckResp,
    Alive,
    IndirectPing,
    Message,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
)
from imgproxy.membership.tags import SerfState, encode_serf_state, encode_tags  # noqa: E402
from imgproxy.membership.wire import (  # noqa: E402
    StreamDecoder,
    WireError,
    decode_packet,
    encode_message,
    encode_packet,
    encode_stream,
)

SERF = "/usr/bin/serf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
KEY = bytes(range(16))  # the committed key of the encrypted fixtures
A_IP, B_IP, FAKE_IP, GHOST_IP = "127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24"
PORT = 7946
FAKE_NAME = "fake"
FAKE_TAGS = {"role": "gateway", "http": "8081"}
VSN = (1, 5, 2, 2, 5, 5)  # what serf 0.9 advertises: memberlist 1..5 (speaks 2), serf 2..5
KEEP_PER_KIND = 2


def _describe(messages: list[Message]) -> str:
    return ",".join(type(m).__name__ for m in messages)


def _details(messages: list[Message]) -> list[str]:
    """``Type:node`` for every message, so trimming keeps each distinct fact once."""
    details = []
    for msg in messages:
        if isinstance(msg, PushPull):
            details += [f"PushPull:{s.name}" for s in msg.states]
        else:
            details.append(f"{type(msg).__name__}:{getattr(msg, 'node', '')}")
    return details


def _ip(addr: str) -> bytes:
    return socket.inet_aton(addr)


class FakeMember:
    """A memberlist peer on FAKE_IP that records what it gets and answers like memberlist."""

    def __init__(self, keyring: Keyring | None) -> None:
        self.keyring = keyring
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((FAKE_IP, PORT))
        self.udp.settimeout(0.2)
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((FAKE_IP, PORT))
        self.tcp.listen(8)
        self.tcp.settimeout(0.2)
        self.threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        self.seq = 1000

    def state(self) -> PushNodeState:
        return PushNodeState(
            name=FAKE_NAME,
            addr=_ip(FAKE_IP),
            port=PORT,
            meta=encode_tags(FAKE_TAGS),
            incarnation=1,
            state=NodeState.ALIVE,
            vsn=VSN,
        )

    def serf_state(self) -> bytes:
        # serf logs an error on a push-pull without its user state
        return encode_serf_state(SerfState(ltime=1, status_ltimes={FAKE_NAME: 1}))

    def record(
        self,
        transport: str,
        direction: str,
        peer: str,
        data: bytes,
        kind: str,
        messages: list[Message] | None = None,
    ) -> None:
        with self.lock:
            self.records.append(
                {
                    "transport": transport,
                    "direction": direction,
                    "peer": peer,
                    "kind": kind,
                    "details": _details(messages or []),
                    "hex": data.hex(),
                    "t": round(time.monotonic(), 3),
                }
            )

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(2)
        self.udp.close()
        self.tcp.close()

    def send_udp(
        self, messages: list[Message], to: str, *, crc: bool = False, compress: bool = False
    ) -> None:
        parts = [encode_message(m) for m in messages]
        packets = encode_packet(
            parts, keyring=self.keyring, protocol_version=2, crc=crc, compress=compress
        )
        for packet in packets:
            self.udp.sendto(packet, (to, PORT))

    def _serve_udp(self) -> None:
        while not self.stop.is_set():
            try:
                data, (host, _) = self.udp.recvfrom(65536)
            except TimeoutError:
                continue
            try:
                messages = decode_packet(data, keyring=self.keyring)
            except WireError as e:
                self.record("udp", "in", host, data, f"UNDECODABLE: {e}")
                continue
            self.record("udp", "in", host, data, _describe(messages), messages)
            for msg in messages:
                if isinstance(msg, Ping) and msg.node == FAKE_NAME:
                    to = socket.inet_ntoa(msg.source_addr) if msg.source_addr else host
                    self.send_udp([AckResp(seq_no=msg.seq_no)], to)

    def _serve_tcp(self) -> None:
        while not self.stop.is_set():
            try:
                conn, (host, _) = self.tcp.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                self._answer_stream(conn, host)

    def _read_message(self, conn: socket.socket, inbound: bool) -> tuple[bytes, list[Message]]:
        decoder = StreamDecoder(self.keyring, inbound=inbound)
        raw = bytearray()
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                raise WireError("connection closed before a whole message")
            raw += chunk
            messages = decoder.feed(chunk)
            if messages:
                return bytes(raw), messages

    def _answer_stream(self, conn: socket.socket, host: str) -> None:
        try:
            raw, messages = self._read_message(conn, inbound=True)
        except (WireError, OSError) as e:
            self.record("tcp", "in", host, b"", f"UNDECODABLE: {e}")
            return
        self.record("tcp", "in", host, raw, _describe(messages), messages)
        msg = messages[0]
        if isinstance(msg, PushPull):
            # Echo serf's own user state: serf logs an error on an empty one.
            reply: Message = PushPull(join=False, states=(self.state(),), user_state=msg.user_state)
        elif isinstance(msg, Ping):
            reply = AckResp(seq_no=msg.seq_no)
        else:
            return
        conn.sendall(encode_stream(reply, keyring=self.keyring, protocol_version=2))

    def dial(self, to: str, msg: Message, kind: str, compress: bool = False) -> None:
        """Open a stream to a serf agent, send ``msg``, record the reply."""
        with socket.create_connection((to, PORT), timeout=5, source_address=(FAKE_IP, 0)) as c:
            c.sendall(
                encode_stream(msg, keyring=self.keyring, protocol_version=2, compress=compress)
            )
            try:
                raw, messages = self._read_message(c, inbound=False)
            except (WireError, OSError) as e:
                self.record("tcp", "in", to, b"", f"UNDECODABLE ({kind}): {e}")
                return
            self.record("tcp", "in", to, raw, f"{_describe(messages)} (reply to {kind})", messages)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


class Agents:
    """Serf agents started here; :meth:`kill_all` ends every one of them."""

    def __init__(self, workdir: Path, encrypt: bytes | None) -> None:
        self.workdir = workdir
        self.encrypt = encrypt
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, ip: str, tags: dict[str, str], join: str | None = None) -> None:
        args = [SERF, "agent", "-node", name, "-bind", f"{ip}:{PORT}", "-advertise", ip]
        args += ["-rpc-addr", f"{ip}:7373", "-log-level", "debug"]
        for key, value in tags.items():
            args += ["-tag", f"{key}={value}"]
        if self.encrypt is not None:
            args += ["-encrypt", base64.b64encode(self.encrypt).decode()]
        if join:
            args += ["-join", join]
        log = open(self.workdir / f"serf-{name}.log", "wb")  # noqa: SIM115 - closed with proc
        self.procs[name] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        wait_for(lambda: rpc(ip, "members") is not None, f"serf {name} RPC")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)
            proc.wait(10)

    def kill_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)


def rpc(ip: str, *args: str) -> str | None:
    """Run a serf CLI command against the agent on ``ip``; None if it fails."""
    try:
        done = subprocess.run(
            # Go's flag parsing stops at the first positional argument: flags go first.
            [SERF, args[0], f"-rpc-addr={ip}:7373", *args[1:]],
            capture_output=True,
            timeout=10,
        )
    except subprocess.TimeoutExpired:
        return None
    return done.stdout.decode() if done.returncode == 0 else None


def _status(ip: str, name: str) -> str | None:
    listing = json.loads(rpc(ip, "members", "-format=json") or '{"members": []}')
    return next((m["status"] for m in listing["members"] if m["name"] == name), None)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def scenario(encrypt: bytes | None, workdir: Path) -> dict[str, object]:
    keyring = Keyring([encrypt]) if encrypt is not None else None
    fake = FakeMember(keyring)
    agents = Agents(workdir, encrypt)
    fake.start()
    notes: dict[str, object] = {}
    try:
        agents.start("a", A_IP, {"role": "worker", "http": "8080"})
        joined = rpc(A_IP, "join", f"{FAKE_IP}:{PORT}")
        notes["join_output"] = joined
        time.sleep(3)  # pings and gossip from a
        fake.send_udp([Ping(seq_no=fake.next_seq(), node="a")], A_IP)
        fake.send_udp(
            [
                Ping(
                    seq_no=fake.next_seq(),
                    node="a",
                    source_addr=_ip(FAKE_IP),
                    source_port=PORT,
                    source_node=FAKE_NAME,
                )
            ],
            A_IP,
        )
        fake.dial(A_IP, Ping(seq_no=fake.next_seq(), node="a"), "stream ping")
        ours = PushPull(join=False, states=(fake.state(),), user_state=fake.serf_state())
        fake.dial(A_IP, ours, "push-pull", compress=True)
        ghost = IndirectPing(
            seq_no=fake.next_seq(),
            target=_ip(GHOST_IP),
            port=PORT,
            node="ghost",
            nack=True,
            source_addr=_ip(FAKE_IP),
            source_port=PORT,
            source_node=FAKE_NAME,
        )
        fake.send_udp([ghost], A_IP)
        # An alive about a node nobody has heard of: serf should gossip it on.
        rumour = Alive(
            incarnation=7,
            node="rumour",
            addr=_ip("127.0.0.25"),
            port=PORT,
            meta=encode_tags({"role": "worker", "http": "9000"}),
            vsn=VSN,
        )
        fake.send_udp([rumour], A_IP)
        # Two more, as one compound, LZW-compressed and CRC-checked: serf must take both.
        rumours = [
            Alive(
                incarnation=3,
                node=f"rumour{i}",
                addr=_ip(f"127.0.0.{25 + i}"),
                port=PORT,
                meta=encode_tags({"role": "worker", "http": "9000"}),
                vsn=VSN,
            )
            for i in (2, 3)
        ]
        fake.send_udp(rumours, A_IP, crc=True, compress=True)
        time.sleep(2)
        agents.start("b", B_IP, {"role": "gateway", "http": "8082"}, join=A_IP)
        time.sleep(4)
        notes["members_a"] = json.loads(rpc(A_IP, "members", "-format=json") or "null")
        agents.kill("b")  # SIGKILL: a probes, asks us for indirect pings, suspects, declares dead
        # Lifeguard starts suspicion at up to 6x the base timeout, and our fake member never
        # nacks, which makes a doubt itself and slow down further: allow it a while.
        wait_for(lambda: _status(A_IP, "b") == "failed", "b to be declared failed", 90)
        notes["members_a_after_kill"] = json.loads(rpc(A_IP, "members", "-format=json") or "null")
        rpc(A_IP, "leave")
        time.sleep(2)
    finally:
        agents.kill_all()
        fake.close()
    return {"notes": notes, "records": fake.records}


def _trim(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep each record that shows something new, and a few of each kind besides."""
    seen_details: set[str] = set()
    per_kind: dict[tuple[object, ...], int] = {}
    kept = []
    for rec in records:
        key = (rec["transport"], rec["peer"], rec["kind"])
        per_kind[key] = per_kind.get(key, 0) + 1
        new = set(rec["details"]) - seen_details
        if new or per_kind[key] <= KEEP_PER_KIND:
            kept.append(rec)
            seen_details |= new
    return kept


def main() -> None:
    version = subprocess.run([SERF, "version"], capture_output=True).stdout.decode()
    FIXTURES.mkdir(exist_ok=True)
    for name, key in (("plain", None), ("encrypted", KEY)):
        with tempfile.TemporaryDirectory(prefix="serf-capture-") as tmp:
            result = scenario(key, Path(tmp))
            logs = {p.name: p.read_text(errors="replace") for p in Path(tmp).glob("*.log")}
        records = result["records"]
        assert isinstance(records, list)
        fixture = {
            "serf_version": version.strip(),
            "key_base64": base64.b64encode(key).decode() if key else None,
            "fake_member": {"name": FAKE_NAME, "addr": FAKE_IP, "tags": FAKE_TAGS},
            "notes": result["notes"],
            "records": _trim(records),
        }
        lines = [line for text in logs.values() for line in text.splitlines()]
        problems = [line for line in lines if "[ERR]" in line or "[WARN]" in line]
        fixture["serf_log_problems"] = problems
        path = FIXTURES / f"serf_{name}.json"
        path.write_text(json.dumps(fixture, indent=1) + "\n")
        kinds = sorted({str(r["kind"]) for r in records})
        print(f"{path}: {len(records)} records, kinds: {kinds}")
        print(f"serf log: {len(lines)} lines; [ERR]/[WARN] ({name}):", *problems[:30], sep="\n  ")


if __name__ == "__main__":
    main()
