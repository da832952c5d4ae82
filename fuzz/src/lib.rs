//! Helpers shared by the fuzz targets: fuzzer-chosen STUN attributes and
//! addresses that the targets encode with the real `relay::stun` builder.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::Arbitrary;
use relay::stun::{attr, Class, Integrity, MessageBuilder, TransactionId};

/// An address from a small set that matters to the relay and agent
/// (public, private, loopback, the relay's own, v4-mapped v6), or any.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// One of [`FIXED`].
    Fixed(u8, u16),
    /// Anything.
    V4([u8; 4], u16),
    /// Anything.
    V6([u8; 16], u16),
}

/// Addresses worth hitting: documentation (allowed) peers, private and
/// loopback (denied), the relay's own, v4-mapped, link-local v6.
pub const FIXED: &[IpAddr] = &[
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 77)),
    IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)),
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)),
    IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x7f00, 1)),
    IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
    IpAddr::V6(Ipv6Addr::LOCALHOST),
];

impl Addr {
    /// The socket address.
    pub fn get(self) -> SocketAddr {
        match self {
            Addr::Fixed(i, p) => SocketAddr::new(FIXED[i as usize % FIXED.len()], p),
            Addr::V4(ip, p) => SocketAddr::new(IpAddr::from(ip), p),
            Addr::V6(ip, p) => SocketAddr::new(IpAddr::from(ip), p),
        }
    }
}

/// One attribute, encoded with the builder's typed helpers where it has them.
#[derive(Arbitrary, Debug, Clone)]
pub enum Attr {
    /// Any type, any value.
    Raw(u16, Vec<u8>),
    /// LIFETIME.
    Lifetime(u32),
    /// REQUESTED-TRANSPORT with this protocol number (17 = UDP).
    RequestedTransport(u8),
    /// XOR-PEER-ADDRESS.
    XorPeer(Addr),
    /// XOR-RELAYED-ADDRESS.
    XorRelayed(Addr),
    /// XOR-MAPPED-ADDRESS.
    XorMapped(Addr),
    /// DATA.
    Data(Vec<u8>),
    /// CHANNEL-NUMBER (0x4000 + n).
    ChannelNumber(u16),
    /// EVEN-PORT with the R bit.
    EvenPort(bool),
    /// RESERVATION-TOKEN.
    ReservationToken([u8; 8]),
    /// REQUESTED-ADDRESS-FAMILY (1 = v4, 2 = v6).
    RequestedFamily(u8),
    /// ADDITIONAL-ADDRESS-FAMILY.
    AdditionalFamily(u8),
    /// DONT-FRAGMENT.
    DontFragment,
    /// CHANGE-REQUEST flags.
    ChangeRequest(u32),
    /// ERROR-CODE.
    Error(u16, String),
    /// SOFTWARE.
    Software(String),
    /// PADDING.
    Padding(u8),
    /// An address attribute of any type, plain encoding.
    Address(u16, Addr),
}

impl Attr {
    /// Appends this attribute.
    pub fn put(&self, b: &mut MessageBuilder<'_>) {
        match self {
            Attr::Raw(t, v) => {
                b.attr(*t, &v[..v.len().min(512)]);
            }
            Attr::Lifetime(s) => {
                b.u32_attr(attr::LIFETIME, *s);
            }
            Attr::RequestedTransport(p) => {
                b.u32_attr(attr::REQUESTED_TRANSPORT, u32::from(*p) << 24);
            }
            Attr::XorPeer(a) => {
                b.xor_address(attr::XOR_PEER_ADDRESS, a.get());
            }
            Attr::XorRelayed(a) => {
                b.xor_address(attr::XOR_RELAYED_ADDRESS, a.get());
            }
            Attr::XorMapped(a) => {
                b.xor_address(attr::XOR_MAPPED_ADDRESS, a.get());
            }
            Attr::Data(d) => {
                b.attr(attr::DATA, &d[..d.len().min(1500)]);
            }
            Attr::ChannelNumber(n) => {
                b.u32_attr(
                    attr::CHANNEL_NUMBER,
                    u32::from(0x4000u16.wrapping_add(*n)) << 16,
                );
            }
            Attr::EvenPort(r) => {
                b.attr(attr::EVEN_PORT, &[if *r { 0x80 } else { 0 }]);
            }
            Attr::ReservationToken(t) => {
                b.attr(attr::RESERVATION_TOKEN, t);
            }
            Attr::RequestedFamily(f) => {
                b.attr(attr::REQUESTED_ADDRESS_FAMILY, &[*f, 0, 0, 0]);
            }
            Attr::AdditionalFamily(f) => {
                b.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[*f, 0, 0, 0]);
            }
            Attr::DontFragment => {
                b.attr(attr::DONT_FRAGMENT, &[]);
            }
            Attr::ChangeRequest(f) => {
                b.u32_attr(attr::CHANGE_REQUEST, *f);
            }
            Attr::Error(code, reason) => {
                b.error(*code % 700, reason);
            }
            Attr::Software(s) => {
                b.attr(attr::SOFTWARE, s.as_bytes());
            }
            Attr::Padding(n) => {
                b.attr(attr::PADDING, &vec![0u8; usize::from(*n)]);
            }
            Attr::Address(t, a) => {
                b.address(*t, a.get());
            }
        }
    }
}

/// The STUN methods the relay knows, or any 12-bit method.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Method {
    /// Binding.
    Binding,
    /// Allocate.
    Allocate,
    /// Refresh.
    Refresh,
    /// Send (an indication).
    Send,
    /// Data (an indication).
    Data,
    /// CreatePermission.
    CreatePermission,
    /// ChannelBind.
    ChannelBind,
    /// Anything else.
    Other(u16),
}

impl Method {
    /// The method number.
    pub fn number(self) -> u16 {
        use relay::stun::method::*;
        match self {
            Method::Binding => BINDING,
            Method::Allocate => ALLOCATE,
            Method::Refresh => REFRESH,
            Method::Send => SEND,
            Method::Data => DATA,
            Method::CreatePermission => CREATE_PERMISSION,
            Method::ChannelBind => CHANNEL_BIND,
            Method::Other(m) => m & 0x0FFF,
        }
    }
}

/// A STUN class.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Cls {
    /// Request.
    Request,
    /// Indication.
    Indication,
    /// Success response.
    Success,
    /// Error response.
    Error,
}

impl From<Cls> for Class {
    fn from(c: Cls) -> Class {
        match c {
            Cls::Request => Class::Request,
            Cls::Indication => Class::Indication,
            Cls::Success => Class::Success,
            Cls::Error => Class::Error,
        }
    }
}

/// Which integrity attribute.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Integ {
    /// MESSAGE-INTEGRITY.
    Sha1,
    /// MESSAGE-INTEGRITY-SHA256.
    Sha256,
}

impl From<Integ> for Integrity {
    fn from(i: Integ) -> Integrity {
        match i {
            Integ::Sha1 => Integrity::Sha1,
            Integ::Sha256 => Integrity::Sha256,
        }
    }
}

/// Encodes a message: header, the attributes, then (optionally)
/// USERNAME/REALM/NONCE, integrity under `key` and FINGERPRINT.
#[allow(clippy::too_many_arguments)]
pub fn encode(
    method: u16,
    class: Class,
    tid: TransactionId,
    attrs: &[Attr],
    creds: Option<(&str, &str, &str)>,
    integrity: Option<(Integrity, &[u8])>,
    fingerprint: bool,
) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    let mut b = MessageBuilder::new(&mut buf, method, class, tid);
    for a in attrs.iter().take(24) {
        a.put(&mut b);
    }
    if let Some((user, realm, nonce)) = creds {
        b.attr(attr::USERNAME, user.as_bytes())
            .attr(attr::REALM, realm.as_bytes())
            .attr(attr::NONCE, nonce.as_bytes());
    }
    if let Some((kind, key)) = integrity {
        b.integrity(kind, key);
    }
    if fingerprint {
        b.fingerprint();
    }
    buf
}
