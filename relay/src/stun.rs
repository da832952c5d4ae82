//! A zero-copy STUN codec (RFC 8489) with the TURN (RFC 8656) and
//! NAT-behaviour-discovery (RFC 5780) attributes the relay and its client use.
//!
//! Parsing borrows the datagram ([`Message::parse`]) and walks attributes
//! lazily; building ([`MessageBuilder`]) writes into a caller-owned `Vec` that
//! can be reused, and finishes with MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT.
//! Nothing here panics on hostile input: every length is checked.

use hmac::{Hmac, Mac};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The fixed magic cookie in every RFC 5389/8489 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the STUN header.
pub const HEADER_LEN: usize = 20;
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// STUN methods used by wgice.
#[allow(missing_docs)]
pub mod method {
    pub const BINDING: u16 = 0x001;
    pub const ALLOCATE: u16 = 0x003;
    pub const REFRESH: u16 = 0x004;
    pub const SEND: u16 = 0x006;
    pub const DATA: u16 = 0x007;
    pub const CREATE_PERMISSION: u16 = 0x008;
    pub const CHANNEL_BIND: u16 = 0x009;
}

/// STUN attribute types used by wgice.
#[allow(missing_docs)]
pub mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const CHANGE_REQUEST: u16 = 0x0003;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    pub const EVEN_PORT: u16 = 0x0018;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const DONT_FRAGMENT: u16 = 0x001A;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    pub const PRIORITY: u16 = 0x0024;
    pub const USE_CANDIDATE: u16 = 0x0025;
    pub const PADDING: u16 = 0x0026;
    pub const RESPONSE_PORT: u16 = 0x0027;
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
    pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    pub const ICMP: u16 = 0x8004;
    pub const SOFTWARE: u16 = 0x8022;
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    pub const FINGERPRINT: u16 = 0x8028;
    pub const ICE_CONTROLLED: u16 = 0x8029;
    pub const ICE_CONTROLLING: u16 = 0x802A;
    pub const RESPONSE_ORIGIN: u16 = 0x802B;
    pub const OTHER_ADDRESS: u16 = 0x802C;
    pub const CONNECTION_ID: u16 = 0x002A;

    /// Attributes this codec's users understand (everything else that is
    /// comprehension-required, i.e. below 0x8000, is answered with 420).
    pub fn is_known(t: u16) -> bool {
        matches!(
            t,
            MAPPED_ADDRESS
                | CHANGE_REQUEST
                | USERNAME
                | MESSAGE_INTEGRITY
                | ERROR_CODE
                | UNKNOWN_ATTRIBUTES
                | CHANNEL_NUMBER
                | LIFETIME
                | XOR_PEER_ADDRESS
                | DATA
                | REALM
                | NONCE
                | XOR_RELAYED_ADDRESS
                | REQUESTED_ADDRESS_FAMILY
                | EVEN_PORT
                | REQUESTED_TRANSPORT
                | DONT_FRAGMENT
                | MESSAGE_INTEGRITY_SHA256
                | PASSWORD_ALGORITHM
                | USERHASH
                | XOR_MAPPED_ADDRESS
                | RESERVATION_TOKEN
                | PRIORITY
                | USE_CANDIDATE
                | PADDING
                | RESPONSE_PORT
                | CONNECTION_ID
        )
    }
}

/// Message class (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A request; expects a response.
    Request,
    /// An indication; no response.
    Indication,
    /// A success response.
    Success,
    /// An error response.
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0,
            Class::Indication => 1,
            Class::Success => 2,
            Class::Error => 3,
        }
    }
}

/// Encodes a method and class into the 14-bit STUN message type.
pub fn message_type(method: u16, class: Class) -> u16 {
    let c = class.bits();
    (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 1) << 4)
        | ((c & 2) << 7)
}

fn split_type(t: u16) -> (u16, Class) {
    let method = (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80);
    let class = match ((t >> 4) & 1) | ((t >> 7) & 2) {
        0 => Class::Request,
        1 => Class::Indication,
        2 => Class::Success,
        _ => Class::Error,
    };
    (method, class)
}

/// Why a datagram is not a well-formed STUN message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Shorter than the 20-byte header.
    #[error("shorter than a STUN header")]
    TooShort,
    /// The two leading bits are not zero or the cookie is wrong.
    #[error("not a STUN message (leading bits or magic cookie)")]
    NotStun,
    /// The header's length disagrees with the datagram or is not a multiple of 4.
    #[error("STUN length field does not match the datagram")]
    BadLength,
    /// An attribute runs past the end of the message.
    #[error("attribute runs past the end of the message")]
    TruncatedAttribute,
}

/// True when `data` looks like a STUN message (cookie at bytes 4..8, top bits 0).
pub fn is_stun(data: &[u8]) -> bool {
    data.len() >= HEADER_LEN
        && data[0] & 0xC0 == 0
        && u32::from_be_bytes([data[4], data[5], data[6], data[7]]) == MAGIC_COOKIE
}

/// A borrowed, validated STUN message.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    raw: &'a [u8],
    method: u16,
    class: Class,
}

/// One attribute: its type, its value (without padding) and its offset in the message.
#[derive(Debug, Clone, Copy)]
pub struct RawAttr<'a> {
    /// Attribute type.
    pub typ: u16,
    /// Value bytes (unpadded).
    pub value: &'a [u8],
    /// Offset of the attribute header within the message.
    pub offset: usize,
}

/// A 96-bit transaction ID.
pub type TransactionId = [u8; 12];

impl<'a> Message<'a> {
    /// Validates the header and attribute framing of `raw` (exactly one message).
    pub fn parse(raw: &'a [u8]) -> Result<Self, ParseError> {
        if raw.len() < HEADER_LEN {
            return Err(ParseError::TooShort);
        }
        if !is_stun(raw) {
            return Err(ParseError::NotStun);
        }
        let len = u16::from_be_bytes([raw[2], raw[3]]) as usize;
        if !len.is_multiple_of(4) || HEADER_LEN + len != raw.len() {
            return Err(ParseError::BadLength);
        }
        let mut off = HEADER_LEN;
        while off < raw.len() {
            if off + 4 > raw.len() {
                return Err(ParseError::TruncatedAttribute);
            }
            let alen = u16::from_be_bytes([raw[off + 2], raw[off + 3]]) as usize;
            let padded = (alen + 3) & !3;
            if off + 4 + padded > raw.len() {
                return Err(ParseError::TruncatedAttribute);
            }
            off += 4 + padded;
        }
        let (method, class) = split_type(u16::from_be_bytes([raw[0], raw[1]]));
        Ok(Message { raw, method, class })
    }

    /// The whole message.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }
    /// The method (e.g. [`method::ALLOCATE`]).
    pub fn method(&self) -> u16 {
        self.method
    }
    /// The class.
    pub fn class(&self) -> Class {
        self.class
    }
    /// The transaction ID.
    pub fn transaction_id(&self) -> TransactionId {
        let mut t = [0u8; 12];
        t.copy_from_slice(&self.raw[8..20]);
        t
    }

    /// Iterates the attributes in order, as a receiver may see them: after
    /// MESSAGE-INTEGRITY(-SHA256) only MESSAGE-INTEGRITY-SHA256 (after
    /// MESSAGE-INTEGRITY) and FINGERPRINT are visible, and nothing after
    /// FINGERPRINT (RFC 8489 §14.5/§14.6: the MAC does not cover what
    /// follows it, so anyone on the path could have appended it). Every
    /// accessor below reads through this.
    pub fn attributes(&self) -> AttrIter<'a> {
        AttrIter {
            raw: self.raw,
            off: HEADER_LEN,
            seen: Seen::Nothing,
        }
    }

    /// The first attribute of a type (see [`Message::attributes`] for which are visible).
    pub fn get(&self, typ: u16) -> Option<&'a [u8]> {
        self.get_attr(typ).map(|a| a.value)
    }

    /// Like [`Message::get`], with the attribute's offset.
    pub fn get_attr(&self, typ: u16) -> Option<RawAttr<'a>> {
        self.attributes().find(|a| a.typ == typ)
    }

    /// Comprehension-required attributes this codec does not know (for 420).
    pub fn unknown_required(&self) -> Vec<u16> {
        self.attributes()
            .filter(|a| a.typ < 0x8000 && !attr::is_known(a.typ))
            .map(|a| a.typ)
            .take(16)
            .collect()
    }

    /// Decodes an XOR-encoded address attribute (XOR-MAPPED/PEER/RELAYED-ADDRESS).
    pub fn xor_address(&self, typ: u16) -> Option<Result<SocketAddr, AddrError>> {
        self.get(typ)
            .map(|v| decode_address(v, Some(&self.transaction_id())))
    }

    /// All XOR-PEER-ADDRESS values (CreatePermission may carry several).
    pub fn xor_addresses(
        &self,
        typ: u16,
    ) -> impl Iterator<Item = Result<SocketAddr, AddrError>> + 'a {
        let tid = self.transaction_id();
        self.attributes()
            .filter(move |a| a.typ == typ)
            .map(move |a| decode_address(a.value, Some(&tid)))
    }

    /// Decodes a plain address attribute (MAPPED-ADDRESS, OTHER-ADDRESS, RESPONSE-ORIGIN).
    pub fn address(&self, typ: u16) -> Option<Result<SocketAddr, AddrError>> {
        self.get(typ).map(|v| decode_address(v, None))
    }

    /// A 32-bit attribute value (LIFETIME, CHANGE-REQUEST, …).
    pub fn u32_attr(&self, typ: u16) -> Option<u32> {
        let v = self.get(typ)?;
        (v.len() == 4).then(|| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }

    /// The ERROR-CODE as (code, reason). `None` when malformed, including a
    /// number of 100 or more (RFC 8489 §14.8), which would otherwise alias
    /// another code (class 3, number 101 is not 401).
    pub fn error_code(&self) -> Option<(u16, &'a str)> {
        let v = self.get(attr::ERROR_CODE)?;
        if v.len() < 4 || v[3] >= 100 {
            return None;
        }
        let code = (v[2] & 0x7) as u16 * 100 + v[3] as u16;
        Some((code, std::str::from_utf8(&v[4..]).unwrap_or("")))
    }

    /// A UTF-8 attribute value (USERNAME, REALM, NONCE, SOFTWARE).
    pub fn str_attr(&self, typ: u16) -> Option<&'a str> {
        self.get(typ).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Checks FINGERPRINT if present. `None` when absent.
    pub fn check_fingerprint(&self) -> Option<bool> {
        let a = self.get_attr(attr::FINGERPRINT)?;
        if a.value.len() != 4 || a.offset + 8 != self.raw.len() {
            return Some(false);
        }
        let want = u32::from_be_bytes([a.value[0], a.value[1], a.value[2], a.value[3]]);
        Some(fingerprint(self.raw, a.offset) == want)
    }

    /// Which integrity attribute the message carries, preferring SHA-256.
    pub fn integrity_kind(&self) -> Option<Integrity> {
        if self.get_attr(attr::MESSAGE_INTEGRITY_SHA256).is_some() {
            Some(Integrity::Sha256)
        } else if self.get_attr(attr::MESSAGE_INTEGRITY).is_some() {
            Some(Integrity::Sha1)
        } else {
            None
        }
    }

    /// Verifies MESSAGE-INTEGRITY-SHA256 (preferred) or MESSAGE-INTEGRITY with `key`.
    /// Returns the kind verified, or `None` when absent or wrong.
    pub fn verify_integrity(&self, key: &[u8]) -> Option<Integrity> {
        // RFC 8489 §14.6: when both are present, MESSAGE-INTEGRITY comes first
        // and covers less; a receiver that knows SHA-256 checks that one.
        if let Some(a) = self.get_attr(attr::MESSAGE_INTEGRITY_SHA256) {
            if a.value.len() < 16 || a.value.len() > 32 {
                return None;
            }
            let mac = integrity_mac(Integrity::Sha256, self.raw, a.offset, a.value.len(), key);
            return ct_eq(&mac[..a.value.len()], a.value).then_some(Integrity::Sha256);
        }
        if let Some(a) = self.get_attr(attr::MESSAGE_INTEGRITY) {
            if a.value.len() != 20 {
                return None;
            }
            let mac = integrity_mac(Integrity::Sha1, self.raw, a.offset, 20, key);
            return ct_eq(&mac[..20], a.value).then_some(Integrity::Sha1);
        }
        None
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Which integrity attribute the iteration has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Nothing,
    Sha1,
    Sha256,
    Fingerprint,
}

/// Iterator over a message's visible attributes ([`Message::attributes`]).
#[derive(Debug, Clone)]
pub struct AttrIter<'a> {
    raw: &'a [u8],
    off: usize,
    seen: Seen,
}

impl<'a> Iterator for AttrIter<'a> {
    type Item = RawAttr<'a>;
    fn next(&mut self) -> Option<RawAttr<'a>> {
        loop {
            if self.seen == Seen::Fingerprint {
                return None;
            }
            let a = self.next_raw()?;
            let visible = match (self.seen, a.typ) {
                (_, attr::FINGERPRINT) => {
                    self.seen = Seen::Fingerprint;
                    true
                }
                (Seen::Nothing, attr::MESSAGE_INTEGRITY) => {
                    self.seen = Seen::Sha1;
                    true
                }
                (Seen::Nothing | Seen::Sha1, attr::MESSAGE_INTEGRITY_SHA256) => {
                    self.seen = Seen::Sha256;
                    true
                }
                (Seen::Nothing, _) => true,
                _ => false,
            };
            if visible {
                return Some(a);
            }
        }
    }
}

impl<'a> AttrIter<'a> {
    /// The next attribute in the datagram, visible or not.
    fn next_raw(&mut self) -> Option<RawAttr<'a>> {
        let raw = self.raw;
        let off = self.off;
        if off + 4 > raw.len() {
            return None;
        }
        let typ = u16::from_be_bytes([raw[off], raw[off + 1]]);
        let len = u16::from_be_bytes([raw[off + 2], raw[off + 3]]) as usize;
        let end = off + 4 + len;
        if end > raw.len() {
            return None;
        }
        self.off = off + 4 + ((len + 3) & !3);
        Some(RawAttr {
            typ,
            value: &raw[off + 4..end],
            offset: off,
        })
    }
}

/// Which MESSAGE-INTEGRITY flavour a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// MESSAGE-INTEGRITY (HMAC-SHA1, 20 bytes).
    Sha1,
    /// MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256, 32 bytes).
    Sha256,
}

/// A malformed address attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddrError {
    /// Wrong length for the family, or too short.
    #[error("address attribute has a bad length")]
    BadLength,
    /// Family other than 0x01 (IPv4) or 0x02 (IPv6).
    #[error("address family {0:#x} is not IPv4 (1) or IPv6 (2)")]
    BadFamily(u8),
}

fn decode_address(v: &[u8], tid: Option<&TransactionId>) -> Result<SocketAddr, AddrError> {
    if v.len() < 4 {
        return Err(AddrError::BadLength);
    }
    let family = v[1];
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    if tid.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match family {
        1 => {
            if v.len() != 8 {
                return Err(AddrError::BadLength);
            }
            let mut ip = u32::from_be_bytes([v[4], v[5], v[6], v[7]]);
            if tid.is_some() {
                ip ^= MAGIC_COOKIE;
            }
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        2 => {
            if v.len() != 20 {
                return Err(AddrError::BadLength);
            }
            let mut b = [0u8; 16];
            b.copy_from_slice(&v[4..20]);
            if let Some(tid) = tid {
                let mut mask = [0u8; 16];
                mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                mask[4..].copy_from_slice(tid);
                for (x, m) in b.iter_mut().zip(mask) {
                    *x ^= m;
                }
            }
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), port))
        }
        f => Err(AddrError::BadFamily(f)),
    }
}

/// The MAC over `raw[..attr_offset]` with the header length adjusted to end
/// after this attribute, whose value is `vlen` bytes (MESSAGE-INTEGRITY-SHA256
/// may be truncated to 16..=32 bytes, RFC 8489 §14.6).
fn integrity_mac(
    kind: Integrity,
    raw: &[u8],
    attr_offset: usize,
    vlen: usize,
    key: &[u8],
) -> [u8; 32] {
    let fake_len = (attr_offset + 4 + vlen - HEADER_LEN) as u16;
    let mut out = [0u8; 32];
    match kind {
        Integrity::Sha1 => {
            let Ok(mut m) = Hmac::<sha1::Sha1>::new_from_slice(key) else {
                return out;
            };
            m.update(&raw[0..2]);
            m.update(&fake_len.to_be_bytes());
            m.update(&raw[4..attr_offset]);
            out[..20].copy_from_slice(&m.finalize().into_bytes());
        }
        Integrity::Sha256 => {
            let Ok(mut m) = Hmac::<sha2::Sha256>::new_from_slice(key) else {
                return out;
            };
            m.update(&raw[0..2]);
            m.update(&fake_len.to_be_bytes());
            m.update(&raw[4..attr_offset]);
            out.copy_from_slice(&m.finalize().into_bytes());
        }
    }
    out
}

fn fingerprint(raw: &[u8], attr_offset: usize) -> u32 {
    let fake_len = (attr_offset + 8 - HEADER_LEN) as u16;
    let mut h = crc32fast::Hasher::new();
    h.update(&raw[0..2]);
    h.update(&fake_len.to_be_bytes());
    h.update(&raw[4..attr_offset]);
    h.finalize() ^ FINGERPRINT_XOR
}

/// The long-term credential key, MD5(username ":" realm ":" password) (RFC 8489 §9.2.2).
pub fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

/// Writes a STUN message into a reusable buffer.
#[derive(Debug)]
pub struct MessageBuilder<'b> {
    buf: &'b mut Vec<u8>,
    tid: TransactionId,
}

impl<'b> MessageBuilder<'b> {
    /// Starts a message, clearing `buf`.
    pub fn new(buf: &'b mut Vec<u8>, method: u16, class: Class, tid: TransactionId) -> Self {
        buf.clear();
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&tid);
        MessageBuilder { buf, tid }
    }

    fn set_len(&mut self) {
        let len = (self.buf.len() - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }

    /// Current encoded length.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when only the header is written.
    pub fn is_empty(&self) -> bool {
        self.buf.len() == HEADER_LEN
    }

    /// Appends a raw attribute (padded to 4 bytes with zeros).
    pub fn attr(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        let len = value.len().min(u16::MAX as usize - 4);
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf.extend_from_slice(&(len as u16).to_be_bytes());
        self.buf.extend_from_slice(&value[..len]);
        let pad = (4 - len % 4) % 4;
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
        self.set_len();
        self
    }

    /// Appends a 32-bit attribute.
    pub fn u32_attr(&mut self, typ: u16, v: u32) -> &mut Self {
        self.attr(typ, &v.to_be_bytes())
    }

    /// Appends an XOR-encoded address attribute.
    pub fn xor_address(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        let v = encode_address(addr, Some(&self.tid));
        self.attr(typ, &v[..addr_len(addr)])
    }

    /// Appends a plain address attribute.
    pub fn address(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        let v = encode_address(addr, None);
        self.attr(typ, &v[..addr_len(addr)])
    }

    /// Appends ERROR-CODE.
    pub fn error(&mut self, code: u16, reason: &str) -> &mut Self {
        let mut v = Vec::with_capacity(4 + reason.len());
        v.extend_from_slice(&[0, 0, (code / 100) as u8, (code % 100) as u8]);
        v.extend_from_slice(reason.as_bytes());
        self.attr(attr::ERROR_CODE, &v)
    }

    /// Appends MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256 computed with `key`.
    pub fn integrity(&mut self, kind: Integrity, key: &[u8]) -> &mut Self {
        let off = self.buf.len();
        let (typ, vlen) = match kind {
            Integrity::Sha1 => (attr::MESSAGE_INTEGRITY, 20),
            Integrity::Sha256 => (attr::MESSAGE_INTEGRITY_SHA256, 32),
        };
        let mac = integrity_mac(kind, self.buf, off, vlen, key);
        self.attr(typ, &mac[..vlen])
    }

    /// Appends FINGERPRINT; must be last.
    pub fn fingerprint(&mut self) -> &mut Self {
        let off = self.buf.len();
        let fp = fingerprint(self.buf, off);
        self.attr(attr::FINGERPRINT, &fp.to_be_bytes())
    }
}

fn addr_len(addr: SocketAddr) -> usize {
    if addr.is_ipv4() {
        8
    } else {
        20
    }
}

fn encode_address(addr: SocketAddr, tid: Option<&TransactionId>) -> [u8; 20] {
    let mut v = [0u8; 20];
    let mut port = addr.port();
    if tid.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    v[2..4].copy_from_slice(&port.to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            v[1] = 1;
            let mut x = u32::from(ip);
            if tid.is_some() {
                x ^= MAGIC_COOKIE;
            }
            v[4..8].copy_from_slice(&x.to_be_bytes());
        }
        IpAddr::V6(ip) => {
            v[1] = 2;
            let mut b = ip.octets();
            if let Some(tid) = tid {
                let mut mask = [0u8; 16];
                mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                mask[4..].copy_from_slice(tid);
                for (x, m) in b.iter_mut().zip(mask) {
                    *x ^= m;
                }
            }
            v[4..20].copy_from_slice(&b);
        }
    }
    v
}

/// ChannelData framing (RFC 8656 §12.4).
pub mod channel_data {
    /// Lowest valid channel number.
    pub const MIN_CHANNEL: u16 = 0x4000;
    /// Highest channel number accepted. RFC 8656 narrowed the range to
    /// 0x4FFF, but RFC 5766 clients (coturn's own tools among them) still use
    /// up to 0x7FFF, and the first byte still tells them apart from STUN
    /// (0x00–0x3F) and from WireGuard (0x01–0x04).
    pub const MAX_CHANNEL: u16 = 0x7FFF;
    /// Highest channel number our client hands out (RFC 8656 range).
    pub const MAX_CHANNEL_RFC8656: u16 = 0x4FFF;
    /// ChannelData header length.
    pub const HEADER_LEN: usize = 4;

    /// A channel number the relay accepts: `MIN_CHANNEL..=MAX_CHANNEL`
    /// (0x4000–0x7FFF, RFC 5766's range; see [`MAX_CHANNEL`] for why not
    /// RFC 8656's narrower one). Construction validates, so a held value is
    /// always a number a ChannelBind may carry.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub struct ChannelNumber(u16);

    impl ChannelNumber {
        /// `n` when it lies in 0x4000–0x7FFF.
        pub const fn new(n: u16) -> Option<Self> {
            if n >= MIN_CHANNEL && n <= MAX_CHANNEL {
                Some(ChannelNumber(n))
            } else {
                None
            }
        }

        /// The number on the wire.
        pub const fn get(self) -> u16 {
            self.0
        }
    }

    impl From<ChannelNumber> for u16 {
        fn from(n: ChannelNumber) -> u16 {
            n.0
        }
    }

    impl std::fmt::Display for ChannelNumber {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:#06x}", self.0)
        }
    }

    /// True when the first byte says ChannelData (0x40..=0x7F).
    pub fn is_channel_data(data: &[u8]) -> bool {
        !data.is_empty() && (0x40..=0x7F).contains(&data[0])
    }

    /// Splits a ChannelData message into (channel, payload). `None` when malformed.
    /// Trailing bytes beyond the length (UDP padding) are ignored.
    pub fn decode(data: &[u8]) -> Option<(u16, &[u8])> {
        if data.len() < HEADER_LEN {
            return None;
        }
        let ch = u16::from_be_bytes([data[0], data[1]]);
        if !(MIN_CHANNEL..=MAX_CHANNEL).contains(&ch) {
            return None;
        }
        let len = u16::from_be_bytes([data[2], data[3]]) as usize;
        data.get(HEADER_LEN..HEADER_LEN + len).map(|p| (ch, p))
    }

    /// The 4-byte header for `len` payload bytes on `channel`.
    pub fn header(channel: u16, len: usize) -> [u8; 4] {
        let c = channel.to_be_bytes();
        let l = (len as u16).to_be_bytes();
        [c[0], c[1], l[0], l[1]]
    }

    /// Appends a full ChannelData message to `out` (padded to 4 when `pad`, as over TCP).
    pub fn encode(out: &mut Vec<u8>, channel: u16, payload: &[u8], pad: bool) {
        out.extend_from_slice(&header(channel, payload.len()));
        out.extend_from_slice(payload);
        if pad {
            let p = (4 - payload.len() % 4) % 4;
            out.extend_from_slice(&[0u8; 3][..p]);
        }
    }
}

/// Length of the next complete STUN or ChannelData frame at the start of a
/// stream buffer (TURN over TCP/TLS, RFC 8656 §12.5). `Ok(None)` means more
/// bytes are needed; `Err` means the stream is not STUN/ChannelData.
pub fn stream_frame_len(buf: &[u8]) -> Result<Option<usize>, ParseError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let total = if channel_data::is_channel_data(buf) {
        channel_data::HEADER_LEN + ((len + 3) & !3)
    } else if buf[0] & 0xC0 == 0 {
        if !len.is_multiple_of(4) {
            return Err(ParseError::BadLength);
        }
        if buf.len() >= 8 && u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) != MAGIC_COOKIE {
            return Err(ParseError::NotStun);
        }
        HEADER_LEN + len
    } else {
        return Err(ParseError::NotStun);
    };
    Ok((buf.len() >= total).then_some(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    // RFC 5769 §2.1 sample request.
    const REQ: &str = "000100582112a442b7e7a701bc34d686fa87dfae
        802200105354554e207465737420636c69656e74
        002400046e0001ff
        80290008932ff9b151263b36
        000600096576746a3a683676592020 20
        000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2
        80280004e57a3bcf";

    #[test]
    fn rfc5769_request() {
        let raw = hex(REQ);
        let m = Message::parse(&raw).expect("parse");
        assert_eq!(m.method(), method::BINDING);
        assert_eq!(m.class(), Class::Request);
        assert_eq!(m.str_attr(attr::USERNAME), Some("evtj:h6vY"));
        assert_eq!(m.check_fingerprint(), Some(true));
        let key = b"VOkJxbRl1RmTxUk/WvJxBt";
        assert_eq!(m.verify_integrity(key), Some(Integrity::Sha1));
        assert_eq!(m.verify_integrity(b"wrong"), None);
    }

    #[test]
    fn rfc5769_ipv4_response() {
        let raw = hex("0101003c2112a442b7e7a701bc34d686fa87dfae
            8022000b7465737420766563746f7220
            002000080001a147e112a643
            000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7
            80280004c07d4c96");
        let m = Message::parse(&raw).expect("parse");
        assert_eq!(m.class(), Class::Success);
        let a = m
            .xor_address(attr::XOR_MAPPED_ADDRESS)
            .expect("attr")
            .expect("addr");
        assert_eq!(a, "192.0.2.1:32853".parse().expect("sa"));
        assert_eq!(
            m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"),
            Some(Integrity::Sha1)
        );
        assert_eq!(m.check_fingerprint(), Some(true));
    }

    #[test]
    fn rfc5769_ipv6_response() {
        let raw = hex("010100482112a442b7e7a701bc34d686fa87dfae
            8022000b7465737420766563746f7220
            002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9
            00080014a382954e4be67bf11784c97c8292c275bfe3ed41
            80280004c8fb0b4c");
        let m = Message::parse(&raw).expect("parse");
        let a = m
            .xor_address(attr::XOR_MAPPED_ADDRESS)
            .expect("attr")
            .expect("addr");
        assert_eq!(
            a,
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                .parse()
                .expect("sa")
        );
        assert_eq!(
            m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"),
            Some(Integrity::Sha1)
        );
        assert_eq!(m.check_fingerprint(), Some(true));
    }

    #[test]
    fn rfc5769_long_term() {
        // §2.4: long-term credentials, username and password in UTF-8 (SASLprep'd).
        let raw = hex("000100602112a44278ad3433c6ad72c029da412e
            00060012e3839ee38388e383aae38383e382afe382b90000
            0015001c662f2f3439396b39353464364f4c33346f4c394653547679363473 41
            0014000b6578616d706c652e6f726700
            00080014f67024656dd64a3e02b8e0712e85c9a28ca89666");
        let m = Message::parse(&raw).expect("parse");
        let user = m.str_attr(attr::USERNAME).expect("user");
        let realm = m.str_attr(attr::REALM).expect("realm");
        assert_eq!(realm, "example.org");
        let key = long_term_key(user, realm, "TheMatrIX");
        assert_eq!(m.verify_integrity(&key), Some(Integrity::Sha1));
    }

    #[test]
    fn build_roundtrip_sha256_and_fingerprint() {
        let mut buf = Vec::new();
        let tid = [7u8; 12];
        let key = long_term_key("u", "r", "p");
        MessageBuilder::new(&mut buf, method::ALLOCATE, Class::Request, tid)
            .u32_attr(attr::REQUESTED_TRANSPORT, 17 << 24)
            .attr(attr::USERNAME, b"u")
            .xor_address(
                attr::XOR_PEER_ADDRESS,
                "[2001:db8::1]:9".parse().expect("sa"),
            )
            .integrity(Integrity::Sha256, &key)
            .fingerprint();
        let m = Message::parse(&buf).expect("parse");
        assert_eq!(m.method(), method::ALLOCATE);
        assert_eq!(m.verify_integrity(&key), Some(Integrity::Sha256));
        assert_eq!(m.check_fingerprint(), Some(true));
        assert_eq!(
            m.xor_address(attr::XOR_PEER_ADDRESS)
                .expect("a")
                .expect("b"),
            "[2001:db8::1]:9".parse().expect("sa")
        );
        // Any flipped bit breaks integrity.
        for i in 20..buf.len() - 8 {
            let mut c = buf.clone();
            c[i] ^= 1;
            if let Ok(m) = Message::parse(&c) {
                assert_ne!(
                    m.verify_integrity(&key),
                    Some(Integrity::Sha256),
                    "byte {i}"
                );
            }
        }
    }

    #[test]
    fn truncated_sha256_integrity_verifies() {
        // RFC 8489 §14.6: MESSAGE-INTEGRITY-SHA256 may be 16..=32 bytes.
        let key = long_term_key("u", "r", "p");
        let mut buf = Vec::new();
        MessageBuilder::new(&mut buf, method::REFRESH, Class::Request, [5; 12])
            .attr(attr::USERNAME, b"u");
        let off = buf.len();
        let mac = integrity_mac(Integrity::Sha256, &buf, off, 16, &key);
        let mut b = MessageBuilder {
            buf: &mut buf,
            tid: [5; 12],
        };
        b.attr(attr::MESSAGE_INTEGRITY_SHA256, &mac[..16]);
        let m = Message::parse(&buf).expect("parse");
        assert_eq!(m.verify_integrity(&key), Some(Integrity::Sha256));
        assert_eq!(m.verify_integrity(b"other"), None);
    }

    #[test]
    fn attributes_after_integrity_are_ignored_by_every_accessor() {
        // RFC 8489 §14.5: only FINGERPRINT may follow MESSAGE-INTEGRITY (and
        // MESSAGE-INTEGRITY-SHA256 may follow MESSAGE-INTEGRITY, §14.6).
        let key = long_term_key("u", "r", "p");
        let vouched: SocketAddr = "203.0.113.5:7000".parse().expect("sa");
        let smuggled: SocketAddr = "203.0.113.66:7000".parse().expect("sa");
        for kind in [Integrity::Sha1, Integrity::Sha256] {
            let mut buf = Vec::new();
            MessageBuilder::new(&mut buf, method::CREATE_PERMISSION, Class::Request, [3; 12])
                .xor_address(attr::XOR_PEER_ADDRESS, vouched)
                .attr(attr::USERNAME, b"u")
                .integrity(kind, &key)
                .xor_address(attr::XOR_PEER_ADDRESS, smuggled)
                .attr(attr::SOFTWARE, b"after")
                .attr(0x7777, b"unknown")
                .u32_attr(attr::LIFETIME, 0)
                .fingerprint();
            let m = Message::parse(&buf).expect("parse");
            assert_eq!(m.verify_integrity(&key), Some(kind), "MAC ends at M-I");
            let peers: Vec<_> = m.xor_addresses(attr::XOR_PEER_ADDRESS).collect();
            assert_eq!(peers, vec![Ok(vouched)], "{kind:?}");
            assert_eq!(m.get(attr::SOFTWARE), None);
            assert_eq!(m.u32_attr(attr::LIFETIME), None);
            assert!(m.unknown_required().is_empty(), "{kind:?}");
            assert_eq!(m.str_attr(attr::USERNAME), Some("u"));
            assert!(m
                .attributes()
                .all(|a| a.typ != attr::SOFTWARE && a.typ != 0x7777));
            // FINGERPRINT still counts after the junk (it is the last attribute)…
            assert_eq!(m.check_fingerprint(), Some(true));
        }
        // …and both integrity kinds in RFC order are seen.
        let mut buf = Vec::new();
        MessageBuilder::new(&mut buf, method::REFRESH, Class::Request, [4; 12])
            .attr(attr::USERNAME, b"u")
            .integrity(Integrity::Sha1, &key)
            .integrity(Integrity::Sha256, &key)
            .fingerprint();
        let m = Message::parse(&buf).expect("parse");
        assert_eq!(m.verify_integrity(&key), Some(Integrity::Sha256));
        assert_eq!(m.check_fingerprint(), Some(true));
    }

    #[test]
    fn type_encoding() {
        for (m, c, t) in [
            (method::BINDING, Class::Request, 0x0001),
            (method::BINDING, Class::Success, 0x0101),
            (method::BINDING, Class::Error, 0x0111),
            (method::ALLOCATE, Class::Error, 0x0113),
            (method::SEND, Class::Indication, 0x0016),
            (method::DATA, Class::Indication, 0x0017),
            (method::CHANNEL_BIND, Class::Success, 0x0109),
        ] {
            assert_eq!(message_type(m, c), t);
            assert_eq!(split_type(t), (m, c));
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u32 = 12345;
        for n in 0..20000usize {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let len = (x as usize) % 120;
            let mut d: Vec<u8> = (0..len)
                .map(|i| (x.rotate_left(i as u32) & 0xff) as u8)
                .collect();
            if d.len() >= 8 && n % 2 == 0 {
                d[0] &= 0x3f;
                d[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                let l = (d.len() - 20.min(d.len())) as u16;
                if d.len() >= 20 {
                    d[2..4].copy_from_slice(&(l & !3).to_be_bytes());
                }
            }
            if let Ok(m) = Message::parse(&d) {
                for a in m.attributes() {
                    let _ = a.value.len();
                }
                let _ = m.xor_address(attr::XOR_PEER_ADDRESS);
                let _ = m.verify_integrity(b"k");
                let _ = m.check_fingerprint();
                let _ = m.error_code();
            }
            let _ = channel_data::decode(&d);
            let _ = stream_frame_len(&d);
        }
    }

    #[test]
    fn error_code_number_over_99_is_malformed() {
        // Found by the stun_parse fuzz target
        // (fuzz/regressions/stun_parse/error-code-number-over-99): class 7,
        // number 251 decoded as "951"; and class 3, number 101 read as 401.
        let raw = hex("1400000c2112a4420404051400001400f8f3deed
            a4000000 00090004 0402fffb");
        let m = Message::parse(&raw).expect("parse");
        assert_eq!(m.error_code(), None);
        let mut buf = Vec::new();
        MessageBuilder::new(&mut buf, method::ALLOCATE, Class::Error, [1; 12])
            .attr(attr::ERROR_CODE, &[0, 0, 3, 101]);
        assert_eq!(Message::parse(&buf).expect("parse").error_code(), None);
        MessageBuilder::new(&mut buf, method::ALLOCATE, Class::Error, [1; 12])
            .error(401, "Unauthorized");
        let m = Message::parse(&buf).expect("parse");
        assert_eq!(m.error_code(), Some((401, "Unauthorized")));
    }

    #[test]
    fn channel_data_codec() {
        let mut out = Vec::new();
        channel_data::encode(&mut out, 0x4001, b"hello", true);
        assert_eq!(out.len(), 12);
        assert_eq!(channel_data::decode(&out), Some((0x4001, &b"hello"[..])));
        assert_eq!(stream_frame_len(&out), Ok(Some(12)));
        assert_eq!(stream_frame_len(&out[..6]), Ok(None));
        assert!(channel_data::decode(&[0x80, 0, 0, 0]).is_none());
    }

    #[test]
    fn channel_numbers_are_0x4000_to_0x7fff() {
        use channel_data::ChannelNumber;
        assert_eq!(ChannelNumber::new(0x3FFF), None);
        assert_eq!(ChannelNumber::new(0x4000).map(u16::from), Some(0x4000));
        assert_eq!(
            ChannelNumber::new(0x7FFF).map(ChannelNumber::get),
            Some(0x7FFF)
        );
        assert_eq!(ChannelNumber::new(0x8000), None);
        assert_eq!(
            ChannelNumber::new(0x4001).map(|n| n.to_string()),
            Some("0x4001".into())
        );
    }
}
