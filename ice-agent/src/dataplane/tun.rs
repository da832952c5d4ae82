//! The embedded mode's TUN interface: created by the agent (it owns it, so
//! it disappears with the process), its MTU, overlay addresses and the
//! routes for the peers' allowed IPs.
//!
//! The device itself is a few ioctls on `/dev/net/tun`; addresses and
//! routes go through `ip` from iproute2 (one command per change, off the
//! packet path). Netlink proper is issue 12's work.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use ipnet::IpNet;

/// Why the TUN interface could not be set up; each says what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunError {
    /// The name is not a valid interface name.
    #[error(
        "wireguard.interface {0:?} is not a valid interface name (1-15 characters, no '/', \
         ':' or whitespace)"
    )]
    BadName(String),
    /// An interface of that name exists already.
    #[error(
        "interface {0:?} already exists: in embedded mode the agent creates its own interface; \
         delete it (`ip link del {0}`) or set another wireguard.interface"
    )]
    NameTaken(String),
    /// `/dev/net/tun` is missing or refuses us.
    #[error(
        "cannot open /dev/net/tun: {0} (load the tun module with `modprobe tun`; in a \
         container pass the device, e.g. `--device /dev/net/tun`, and CAP_NET_ADMIN)"
    )]
    NoDevice(io::Error),
    /// A step of the set-up failed.
    #[error("setting up interface {name:?}: {what}: {source}")]
    Setup {
        /// The interface.
        name: String,
        /// The step.
        what: String,
        /// Why.
        source: io::Error,
    },
}

/// An open TUN interface (non-blocking fd). Dropping it deletes the
/// interface, and with it its addresses and routes.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
    /// Packets carry a `virtio_net_hdr` and the kernel hands over TCP
    /// segments up to 64 KiB ([`super::offload`]).
    offload: bool,
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: a zeroed ifreq is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req
}

/// Whether `name` can be a Linux interface name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

impl Tun {
    /// Creates interface `name` with `mtu`, gives it `addresses` and brings
    /// it up. Refuses a name that exists already. With `offload`, asks the
    /// kernel for TSO and checksum offload (packets then carry a
    /// `virtio_net_hdr`); a kernel that refuses gets a plain TUN.
    pub fn create(
        name: &str,
        mtu: u16,
        addresses: &[IpNet],
        offload: bool,
    ) -> Result<Tun, TunError> {
        if !valid_name(name) {
            return Err(TunError::BadName(name.to_owned()));
        }
        let c = std::ffi::CString::new(name).map_err(|_| TunError::BadName(name.to_owned()))?;
        // SAFETY: a valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(c.as_ptr()) } != 0 {
            return Err(TunError::NameTaken(name.to_owned()));
        }
        // SAFETY: open(2) with a static NUL-terminated path.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(TunError::NoDevice(io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let setup = |what: &str, source: io::Error| TunError::Setup {
            name: name.to_owned(),
            what: what.to_owned(),
            source,
        };
        let mut req = ifreq_for(name);
        let vnet = if offload { libc::IFF_VNET_HDR } else { 0 };
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI | vnet) as libc::c_short;
        // SAFETY: TUNSETIFF takes a pointer to an ifreq.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) | Some(libc::EEXIST) => TunError::NameTaken(name.to_owned()),
                Some(libc::ENOTTY) | Some(libc::EBADFD) | Some(libc::EINVAL) => {
                    TunError::NoDevice(e)
                }
                _ => setup("TUNSETIFF", e),
            });
        }
        let mut tun = Tun {
            fd,
            name: name.to_owned(),
            offload,
        };
        if offload {
            let hdr: libc::c_int = super::offload::VNET_HDR_LEN as libc::c_int;
            let tcp = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
            let udp = libc::TUN_F_USO4 | libc::TUN_F_USO6;
            // SAFETY: TUNSETVNETHDRSZ takes a pointer to an int, TUNSETOFFLOAD
            // the flags as the argument itself. USO (Linux ≥ 6.2) is asked
            // for first, then TSO alone.
            let ok = unsafe {
                libc::ioctl(tun.fd(), libc::TUNSETVNETHDRSZ, &hdr) == 0
                    && (libc::ioctl(tun.fd(), libc::TUNSETOFFLOAD, (tcp | udp) as libc::c_ulong)
                        == 0
                        || libc::ioctl(tun.fd(), libc::TUNSETOFFLOAD, tcp as libc::c_ulong) == 0)
            };
            if !ok {
                // Headers stay on (the flag is set), offloads off: every
                // packet arrives whole, with a header saying so.
                tracing::warn!(
                    interface = name,
                    "the kernel refuses TUN offloads ({}); packets go one by one",
                    io::Error::last_os_error()
                );
            }
            tun.offload = true;
        }
        tun.ctl_ioctl(libc::SIOCSIFMTU, |r| r.ifr_ifru.ifru_mtu = i32::from(mtu))
            .map_err(|e| setup(&format!("MTU {mtu}"), e))?;
        for a in addresses {
            ip(&["addr", "add", &a.to_string(), "dev", name])
                .map_err(|e| setup(&format!("address {a}"), e))?;
        }
        tun.ctl_ioctl(libc::SIOCSIFFLAGS, |r| {
            r.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short
        })
        .map_err(|e| setup("bringing it up", e))?;
        Ok(tun)
    }

    fn ctl_ioctl(&self, op: libc::Ioctl, set: impl FnOnce(&mut libc::ifreq)) -> io::Result<()> {
        // SAFETY: a plain datagram socket for interface ioctls, owned below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd we own.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        let mut req = ifreq_for(&self.name);
        set(&mut req);
        // SAFETY: interface ioctls take a pointer to an ifreq.
        if unsafe { libc::ioctl(s.as_raw_fd(), op, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fd (non-blocking), for poll.
    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Reads one packet; `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reading into a live buffer of the given length.
        let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Whether packets carry a `virtio_net_hdr` (reads start with one;
    /// [`Tun::write`] adds one).
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Writes one packet (on an offloading TUN, after a zero header: a
    /// whole packet, checksums complete).
    pub fn write(&self, pkt: &[u8]) -> io::Result<usize> {
        self.write_with(&[0; super::offload::VNET_HDR_LEN], pkt)
    }

    /// Writes one packet with its `virtio_net_hdr` (ignored when the TUN
    /// does not offload).
    pub fn write_with(
        &self,
        hdr: &[u8; super::offload::VNET_HDR_LEN],
        pkt: &[u8],
    ) -> io::Result<usize> {
        if self.offload {
            let iov = [
                libc::iovec {
                    iov_base: hdr.as_ptr() as *mut libc::c_void,
                    iov_len: hdr.len(),
                },
                libc::iovec {
                    iov_base: pkt.as_ptr() as *mut libc::c_void,
                    iov_len: pkt.len(),
                },
            ];
            // SAFETY: two live buffers of the given lengths.
            let n = unsafe { libc::writev(self.fd(), iov.as_ptr(), 2) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(n as usize);
        }
        // SAFETY: writing from a live buffer of the given length.
        let n = unsafe { libc::write(self.fd(), pkt.as_ptr().cast(), pkt.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        io::Error::new(e.kind(), format!("cannot run `ip` ({e}): install iproute2"))
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The routes an interface needs: every allowed IP that its own addresses'
/// prefixes do not already cover (those have connected routes).
pub fn routes_needed(own: &[IpNet], allowed: &[IpNet]) -> Vec<IpNet> {
    let mut v: Vec<IpNet> = allowed
        .iter()
        .map(|n| n.trunc())
        .filter(|n| !own.iter().any(|o| o.trunc().contains(n)))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Keeps the interface's routes equal to what the peers' allowed IPs need:
/// adds the missing, removes the ones no longer wanted (only routes it added
/// itself).
#[derive(Debug)]
pub struct Routes {
    name: String,
    own: Vec<IpNet>,
    applied: Vec<IpNet>,
}

impl Routes {
    /// For interface `name` with addresses `own`.
    pub fn new(name: &str, own: &[IpNet]) -> Routes {
        Routes {
            name: name.to_owned(),
            own: own.to_vec(),
            applied: Vec::new(),
        }
    }

    /// Brings the routes in line with `allowed` (every peer's allowed IPs).
    pub fn sync(&mut self, allowed: &[IpNet]) {
        let want = routes_needed(&self.own, allowed);
        for r in self.applied.iter().filter(|r| !want.contains(r)) {
            if let Err(e) = ip(&["route", "del", &r.to_string(), "dev", &self.name]) {
                tracing::debug!(route = %r, "route del: {e}");
            }
        }
        for r in want.iter().filter(|r| !self.applied.contains(r)) {
            let fam = if matches!(r.addr(), IpAddr::V6(_)) {
                "-6"
            } else {
                "-4"
            };
            if let Err(e) = ip(&[fam, "route", "replace", &r.to_string(), "dev", &self.name]) {
                tracing::warn!(route = %r, interface = %self.name, "cannot add the route: {e}");
            }
        }
        self.applied = want;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        assert!(valid_name("wg0"));
        assert!(valid_name("wgice-home.1"));
        for bad in ["", "0123456789abcdef", "a/b", "a:b", "a b", ".", ".."] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn routes_cover_only_what_the_own_prefixes_do_not() {
        let own = [n("10.8.0.1/24"), n("fd00::1/64")];
        let allowed = [
            n("10.8.0.2/32"),
            n("10.88.1.0/24"),
            n("10.88.1.7/24"),
            n("fd00::2/128"),
            n("fd01::/64"),
        ];
        assert_eq!(
            routes_needed(&own, &allowed),
            vec![n("10.88.1.0/24"), n("fd01::/64")]
        );
        // A /32 own address covers nothing else.
        assert_eq!(
            routes_needed(&[n("10.8.0.1/32")], &[n("10.8.0.2/32")]),
            vec![n("10.8.0.2/32")]
        );
    }
}
