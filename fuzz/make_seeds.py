#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/corpus/<target>/ from real
inputs in the tree: the RFC 5769 vectors in relay/src/stun.rs's tests, the
example configurations in the three config.rs module docs, the wg.rs test
texts, and signaling frames as the crate encodes them (serde's
`{"type": ...}` JSON). Run from anywhere: `python3 fuzz/make_seeds.py`.

The structured targets (relay_server, turn_client, signaling_open,
agent_messages) read `arbitrary` input, which has no encoder: their seeds
are a merged corpus from a fuzzing run (`-merge=1`), not generated here.
"""
import base64
import json
import os
import re
import struct
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus")


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def doc_block(path, lang="toml"):
    """The fenced block in a file's `//!` module docs."""
    lines = [l[4:] if l.startswith("//! ") else l[3:] for l in read(path).splitlines() if l.startswith("//!")]
    text = "\n".join(lines)
    m = re.search(r"```" + lang + r"\n(.*?)```", text, re.S)
    return m.group(1)


# --- STUN: the RFC 5769 vectors from relay's tests -------------------------
stun_src = read("relay/src/stun.rs")
vectors = []
for m in re.finditer(r'(?:hex\(|const REQ: &str = )"([0-9a-f\s]+)"', stun_src):
    vectors.append(bytes.fromhex("".join(m.group(1).split())))
assert len(vectors) >= 4, "RFC 5769 vectors not found in relay/src/stun.rs"
for i, v in enumerate(vectors):
    write("stun_parse", f"rfc5769-{i}", v)
    write("agent_demux", f"stun-{i}", v)


def stun(msg_type, tid, attrs):
    body = b""
    for t, v in attrs:
        body += struct.pack(">HH", t, len(v)) + v + b"\0" * ((4 - len(v) % 4) % 4)
    return struct.pack(">HHI", msg_type, len(body), 0x2112A442) + tid + body


# An Allocate request as the client sends it first (REQUESTED-TRANSPORT UDP),
# and one with credentials, LIFETIME and a FINGERPRINT.
alloc = stun(0x0003, b"\x07" * 12, [(0x0019, bytes([17, 0, 0, 0]))])
write("stun_parse", "allocate", alloc)
auth = stun(0x0003, b"\x08" * 12, [(0x0019, bytes([17, 0, 0, 0])), (0x000D, struct.pack(">I", 600)),
                                  (0x0006, b"alice"), (0x0014, b"wgice.test"), (0x0015, b"AAAAAAAAAAAAAAAAAA")])
fp = zlib.crc32(auth[:2] + struct.pack(">H", len(auth) - 20 + 8) + auth[4:]) ^ 0x5354554E
write("stun_parse", "allocate-auth-fp", stun(0x0003, b"\x08" * 12, [
    (0x0019, bytes([17, 0, 0, 0])), (0x000D, struct.pack(">I", 600)), (0x0006, b"alice"),
    (0x0014, b"wgice.test"), (0x0015, b"AAAAAAAAAAAAAAAAAA"), (0x8028, struct.pack(">I", fp))]))
write("stun_parse", "error-401", stun(0x0113, b"\x09" * 12, [(0x0009, b"\0\0\x04\x01Unauthorized"),
                                                            (0x0014, b"wgice.test"), (0x0015, b"nonce")]))

# --- ChannelData (channel_data_codec test: 0x4001 "hello", padded) ---------
write("channel_data", "hello-padded", struct.pack(">HH", 0x4001, 5) + b"hello\0\0\0")
write("channel_data", "empty", struct.pack(">HH", 0x7FFF, 0))
write("agent_demux", "channel-data", struct.pack(">HH", 0x4001, 5) + b"hello")

# --- WireGuard message shapes (demux tests) -------------------------------
for t, n in [(1, 148), (2, 92), (3, 64), (4, 32), (4, 1452)]:
    write("agent_demux", f"wg-{t}-{n}", bytes([t, 0, 0, 0]) + b"\x21\x12\xa4\x42" + b"\x55" * (n - 8))

# --- Signaling frames (serde's JSON of ClientFrame/ServerFrame) -----------
key = base64.b64encode(bytes(range(32))).decode()
key2 = base64.b64encode(bytes([9] * 32)).decode()
env = {"from": key, "to": key2, "ts": 1700000000000,
       "nonce": base64.b64encode(bytes(24)).decode(), "ct": base64.b64encode(bytes(40)).decode()}
offer = {"type": "offer", "session": 7, "ufrag": "uf", "pwd": "secretpassword",
         "candidates": ["candidate:1 1 udp 2130706431 192.0.2.1 51820 typ host"], "wg_port": 51820}
frames = {
    "ping": {"type": "ping", "id": 9},
    "list-members": {"type": "list_members"},
    "register": {"type": "register", "version": 1, "mesh": "prod", "token": "t", "key": key,
                 "overlay": ["10.8.0.1/32", "fd00::1"], "proof": base64.b64encode(bytes(32)).decode()},
    "send": {"type": "send", "envelope": env},
    "challenge": {"type": "challenge", "version": 1, "server_key": key, "nonce": base64.b64encode(bytes(32)).decode()},
    "members": {"type": "members", "members": [{"key": key, "overlay": ["10.8.0.2"]}], "done": True},
    "message": {"type": "message", "envelope": env},
    "undeliverable": {"type": "undeliverable", "to": key2, "reason": "queue_full"},
    "error": {"type": "error", "code": "rate_limited", "message": "slow down", "fatal": False},
    "envelope": env,
    "offer": offer,
    "candidate": {"type": "candidate", "session": 7, "candidate": "candidate:2 1 udp 1 198.51.100.2 3478 typ relay raddr 0.0.0.0 rport 0"},
}
stream = b"\xff"
for name, f in frames.items():
    j = json.dumps(f, separators=(",", ":")).encode()
    write("signaling_frame", name, j)
    stream += struct.pack(">I", len(j)) + j if len(j) < 1020 else b""
write("signaling_frame", "stream", stream)

# --- wg.rs test texts -----------------------------------------------------
a, b = "11" * 32, "22" * 32
write("wg_parsers", "uapi-get",
      f"private_key={a}\nlisten_port=51820\npublic_key={b}\npreshared_key={'00' * 32}\n"
      "endpoint=127.0.0.1:4000\nlast_handshake_time_sec=17\nrx_bytes=9\ntx_bytes=10\n"
      "persistent_keepalive_interval=25\nallowed_ip=10.8.0.2/32\nallowed_ip=fd00::2/128\n"
      f"public_key={a}\nerrno=0\n")
k, p = base64.b64encode(bytes([7] * 32)).decode(), base64.b64encode(bytes([8] * 32)).decode()
write("wg_parsers", "dump",
      f"{k}\t{p}\t51820\toff\n{p}\t(none)\t10.0.0.1:51820\t10.8.0.2/32,fd00::2/128\t5\t6\t7\toff\n")

# --- Configurations: the examples in the module docs ----------------------
write("config_parsers", "signaling", doc_block("signaling/src/config.rs"))
agent = doc_block("ice-agent/src/config.rs")
# The target skips texts naming a file (it reads private_key_file).
agent = re.sub(r'private_key_file = "[^"]*"', 'private_key = "' + base64.b64encode(bytes([5] * 32)).decode() + '"', agent)
write("config_parsers", "agent", agent)
write("config_parsers", "relay",
      'listen = ["0.0.0.0:3478", "[::]:3478"]\ntcp-listen = ["0.0.0.0:3478"]\nrealm = "example.org"\n'
      'user = ["alice:wonderland"]\nauth-secret = ["s3cret"]\nrelay-ip = ["192.0.2.1"]\n'
      'external-ip = ["203.0.113.1"]\nrelay-ports = "49152-65535"\nallow-peer = ["10.0.0.0/8"]\n'
      'max-allocations = 1000\nbandwidth-limit = 1000000\nunauth-rate = 20.0\nworkers = 2\n'
      'log-format = "json"\nmax-lifetime = 3600\nmetrics = "127.0.0.1:9641"\n')
print("seeds written under", OUT)
