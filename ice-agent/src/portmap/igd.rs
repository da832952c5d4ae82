//! UPnP-IGD port mapping (UPnP Device Architecture 1.1; the
//! `WANIPConnection:1/2` and `WANPPPConnection:1` services), for gateways
//! that speak neither PCP nor NAT-PMP.
//!
//! Sans-IO: URL, description, HTTP and SOAP parsers and request builders,
//! and [`after_add`], which decides what an `AddPortMapping` answer means.
//! The driver ([`super::driver`]) finds the gateway with SSDP, fetches its
//! description and makes the calls, over plain HTTP/1.1 with
//! `Connection: close`.
//!
//! Every byte the gateway sends is hostile: responses are read up to
//! [`MAX_RESPONSE`] bytes, XML is scanned for a few known elements (never
//! built into a tree), values are bounded and printable, and every URL the
//! gateway names must point at the gateway itself (the default route's
//! next hop): an IGD cannot send the agent anywhere else.
//!
//! Hand-written rather than `igd-next`: its blocking client alone brings
//! about 60 crates (attohttpc, url with the ICU/IDNA tables, xml-rs,
//! xmltree, a second `rand`) for three SOAP calls to one literal IPv4
//! address (docs/ice-agent.md, "Port mapping").

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};

use crate::netcheck::gateway::printable;

/// Largest HTTP response we read (a description or a SOAP answer; real
/// gateways send a few KiB).
pub const MAX_RESPONSE: usize = 64 * 1024;
/// Longest URL path we accept from a gateway.
const MAX_PATH: usize = 256;
/// Lease we ask for; renewed well before (see [`super::MAX_RENEW_INTERVAL`]).
pub const LEASE_SECONDS: u32 = 3600;
/// `AddPortMapping` attempts with another external port after a conflict.
pub const PORT_ATTEMPTS: u32 = 4;
/// The description the mapping carries at the gateway.
pub const DESCRIPTION: &str = "wgice ice-agent";

/// An `http://` URL on the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// The gateway's address (only literal IPv4 is accepted).
    pub host: Ipv4Addr,
    /// TCP port.
    pub port: u16,
    /// Absolute path (with query, if any), printable ASCII.
    pub path: String,
}

impl HttpUrl {
    /// Where to connect.
    pub fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.host, self.port)
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}:{}{}", self.host, self.port, self.path)
    }
}

/// Parses an absolute `http://a.b.c.d[:port]/path` URL that must name
/// `gateway`. Host names, IPv6, user info, `https` and other hosts are
/// refused with the reason.
pub fn parse_url(s: &str, gateway: Ipv4Addr) -> Result<HttpUrl, String> {
    let s = s.trim();
    let rest = s
        .strip_prefix("http://")
        .ok_or_else(|| format!("{:?} is not an http:// URL", printable(s)))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("bad port in {:?}", printable(s)))?,
        ),
        None => (authority, 80),
    };
    let host: Ipv4Addr = host
        .parse()
        .map_err(|_| format!("{:?} does not name an IPv4 address", printable(s)))?;
    if host != gateway {
        return Err(format!(
            "{host} is not the gateway {gateway} (a gateway may only point at itself)"
        ));
    }
    Ok(HttpUrl {
        host,
        port,
        path: clean_path(path)?,
    })
}

/// A URL from the description: absolute (then it must name the gateway),
/// or a path relative to `base` (`/ctl` or `ctl`).
pub fn resolve(base: &HttpUrl, s: &str) -> Result<HttpUrl, String> {
    let s = s.trim();
    if s.starts_with("http://") {
        return parse_url(s, base.host);
    }
    if s.contains("://") {
        return Err(format!("{:?} is not an http:// URL", printable(s)));
    }
    let path = if s.starts_with('/') {
        s.to_string()
    } else {
        let dir = base.path.rsplit_once('/').map_or("", |(d, _)| d);
        format!("{dir}/{s}")
    };
    Ok(HttpUrl {
        host: base.host,
        port: base.port,
        path: clean_path(&path)?,
    })
}

fn clean_path(p: &str) -> Result<String, String> {
    if p.len() > MAX_PATH || !p.starts_with('/') || !p.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("bad URL path {:?}", printable(p)));
    }
    Ok(p.to_string())
}

/// The gateway's WAN connection service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Its `serviceType` URN (SOAP actions are named in it).
    pub service_type: String,
    /// Its control URL.
    pub control: HttpUrl,
}

/// Finds the WAN connection service in a device description fetched from
/// `location`: `WANIPConnection:2`, else `:1`, else `WANPPPConnection:1`.
pub fn find_service(xml: &str, location: &HttpUrl) -> Result<Service, String> {
    let base = match element(xml, "URLBase") {
        Some(b) if !b.is_empty() => parse_url(&b, location.host)?,
        _ => location.clone(),
    };
    let mut best: Option<(u8, String, String)> = None;
    for block in blocks(xml, "service").take(64) {
        let (Some(st), Some(ctl)) = (element(block, "serviceType"), element(block, "controlURL"))
        else {
            continue;
        };
        let rank = if st.starts_with("urn:schemas-upnp-org:service:WANIPConnection:2") {
            3
        } else if st.starts_with("urn:schemas-upnp-org:service:WANIPConnection:1") {
            2
        } else if st.starts_with("urn:schemas-upnp-org:service:WANPPPConnection:1") {
            1
        } else {
            continue;
        };
        if best.as_ref().is_none_or(|(r, _, _)| rank > *r) {
            best = Some((rank, st, ctl));
        }
    }
    let (_, service_type, ctl) =
        best.ok_or("the gateway's description names no WANIPConnection/WANPPPConnection service")?;
    Ok(Service {
        service_type,
        control: resolve(&base, &ctl)?,
    })
}

/// A GET request for `url`.
pub fn http_get(url: &HttpUrl) -> Vec<u8> {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\nUser-Agent: wgice UPnP/1.1\r\n\r\n",
        url.path, url.host, url.port
    )
    .into_bytes()
}

/// A SOAP call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `GetExternalIPAddress`.
    GetExternalIp,
    /// `AddPortMapping` of UDP `external` → `client:internal`.
    Add {
        /// External port.
        external: u16,
        /// Our port.
        internal: u16,
        /// Our LAN address.
        client: Ipv4Addr,
        /// Lease in seconds (0: permanent).
        lease: u32,
    },
    /// `DeletePortMapping` of UDP `external`.
    Delete {
        /// External port.
        external: u16,
    },
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::GetExternalIp => "GetExternalIPAddress",
            Action::Add { .. } => "AddPortMapping",
            Action::Delete { .. } => "DeletePortMapping",
        }
    }
}

/// The HTTP POST carrying `action` to `service`.
pub fn soap_request(service: &Service, action: &Action) -> Vec<u8> {
    let mut args = String::new();
    let mut arg = |k: &str, v: &dyn std::fmt::Display| {
        let _ = write!(args, "<{k}>{v}</{k}>");
    };
    match action {
        Action::GetExternalIp => {}
        Action::Add {
            external,
            internal,
            client,
            lease,
        } => {
            arg("NewRemoteHost", &"");
            arg("NewExternalPort", external);
            arg("NewProtocol", &"UDP");
            arg("NewInternalPort", internal);
            arg("NewInternalClient", client);
            arg("NewEnabled", &1);
            arg("NewPortMappingDescription", &DESCRIPTION);
            arg("NewLeaseDuration", lease);
        }
        Action::Delete { external } => {
            arg("NewRemoteHost", &"");
            arg("NewExternalPort", external);
            arg("NewProtocol", &"UDP");
        }
    }
    let name = action.name();
    let st = &service.service_type;
    let body = format!(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
         <u:{name} xmlns:u=\"{st}\">{args}</u:{name}></s:Body></s:Envelope>\r\n"
    );
    let url = &service.control;
    format!(
        "POST {} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\n\
         Content-Type: text/xml; charset=\"utf-8\"\r\nContent-Length: {}\r\n\
         SOAPAction: \"{st}#{name}\"\r\n\r\n{body}",
        url.path,
        url.host,
        url.port,
        body.len()
    )
    .into_bytes()
}

/// An HTTP response: status code and body (decoded from chunks if need be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body, lossily decoded as UTF-8.
    pub body: String,
}

/// Parses a whole HTTP/1.x response (everything read until the gateway
/// closed, at most [`MAX_RESPONSE`] bytes). `Content-Length` bodies must be
/// complete; chunked bodies are decoded; otherwise the body runs to the end.
pub fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let raw = &raw[..raw.len().min(MAX_RESPONSE)];
    let end = find(raw, b"\r\n\r\n").ok_or("no complete HTTP header")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(format!(
            "not an HTTP response: {:?}",
            printable(status_line)
        ));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| format!("bad HTTP status line {:?}", printable(status_line)))?;
    let (mut length, mut chunked) = (None, false);
    for line in lines.take(64) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "content-length" {
            length = Some(
                v.parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {:?}", printable(v)))?,
            );
        } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or_else(|| format!("body shorter than its Content-Length {n}"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = find(b, b"\r\n").ok_or("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {:?}", printable(size_text)))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = b.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        b = b.get(size + 2..).ok_or("truncated chunk")?;
    }
}

/// A UPnP error from a SOAP fault: its code and description.
pub fn upnp_error(body: &str) -> Option<(u16, String)> {
    let code = element(body, "errorCode")?.parse().ok()?;
    Some((code, element(body, "errorDescription").unwrap_or_default()))
}

/// The external address in a `GetExternalIPAddress` answer.
pub fn external_ip(r: &Response) -> Result<Ipv4Addr, String> {
    if r.status != 200 {
        return Err(fault("GetExternalIPAddress", r));
    }
    let v = element(&r.body, "NewExternalIPAddress")
        .ok_or("GetExternalIPAddress answered without NewExternalIPAddress")?;
    let ip: Ipv4Addr = v
        .parse()
        .map_err(|_| format!("GetExternalIPAddress answered {:?}", printable(&v)))?;
    if ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_link_local()
    {
        return Err(format!("the gateway's external address {ip} is not usable"));
    }
    Ok(ip)
}

/// What to do after an `AddPortMapping` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddOutcome {
    /// Mapped as asked.
    Mapped,
    /// The port is taken (718) or refused as a port (716): try `port`.
    OtherPort(u16),
    /// The gateway only grants permanent leases (725): ask again with 0.
    Permanent,
    /// Give up, with the reason.
    GiveUp(String),
}

/// Decides what an `AddPortMapping` answer means; `attempt` counts the
/// calls so far (from 1), `random_port` is a fresh random port ≥ 1024 for
/// a retry, `lease` the lease just asked for.
pub fn after_add(r: &Response, attempt: u32, random_port: u16, lease: u32) -> AddOutcome {
    if r.status == 200 {
        return AddOutcome::Mapped;
    }
    match upnp_error(&r.body) {
        Some((716 | 718, _)) if attempt < PORT_ATTEMPTS => {
            AddOutcome::OtherPort(random_port.max(1024))
        }
        Some((725, _)) if lease != 0 => AddOutcome::Permanent,
        _ => AddOutcome::GiveUp(fault("AddPortMapping", r)),
    }
}

/// "AddPortMapping refused: 718 ConflictInMappingEntry" and the like.
pub fn fault(action: &str, r: &Response) -> String {
    match upnp_error(&r.body) {
        Some((code, desc)) => format!("{action} refused: UPnP error {code} {desc}"),
        None => format!("{action} refused: HTTP {}", r.status),
    }
}

/// Text of the first `<name>` (or `<prefix:name>`) element, entities for
/// `&amp; &lt; &gt; &quot; &apos;` decoded, trimmed, printable, bounded.
/// Attributes on the opening tag are allowed.
pub fn element(xml: &str, name: &str) -> Option<String> {
    let (start, _) = open_tag(xml, name)?;
    let inner = &xml[start..];
    let end = inner.find('<')?;
    let v = inner[..end]
        .trim()
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&");
    Some(printable(&v))
}

/// The contents of every `<name>…</name>` block, in order.
fn blocks<'a>(xml: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    let mut rest = xml;
    std::iter::from_fn(move || {
        let (start, _) = open_tag(rest, name)?;
        let inner = &rest[start..];
        let close = format!("/{name}>");
        let end = inner.find(&close)?;
        let block = &inner[..end];
        rest = &inner[end + close.len()..];
        Some(block)
    })
}

/// Byte index just past the first `<name …>` or `<x:name …>` opening tag,
/// and where the tag began.
fn open_tag(xml: &str, name: &str) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(i) = xml[from..].find('<') {
        let at = from + i;
        let tag = &xml[at + 1..];
        // A tag ends at `>`; a `<` first means this was no tag (scanning
        // only up to the next `<` keeps the whole search linear).
        let end = tag.find(['>', '<'])?;
        let head = &tag[..end];
        let tag_name = head.split_whitespace().next().unwrap_or_default();
        let local = tag_name.rsplit(':').next().unwrap_or_default();
        if tag.as_bytes()[end] == b'>'
            && local == name
            && !tag_name.starts_with(['/', '?', '!'])
            && !head.ends_with('/')
        {
            return Some((at + 1 + end + 1, at));
        }
        from = at + 1;
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);

    fn loc() -> HttpUrl {
        parse_url("http://192.168.1.1:40000/rootDesc.xml", GW).expect("url")
    }

    #[test]
    fn urls_must_point_at_the_gateway() {
        let u = loc();
        assert_eq!(u.addr(), SocketAddrV4::new(GW, 40000));
        assert_eq!(u.path, "/rootDesc.xml");
        assert_eq!(u.to_string(), "http://192.168.1.1:40000/rootDesc.xml");
        assert_eq!(parse_url("http://192.168.1.1", GW).expect("u").port, 80);
        for bad in [
            "http://10.0.0.1:80/x",
            "https://192.168.1.1/x",
            "http://router.local/x",
            "http://[::1]:80/x",
            "http://192.168.1.1:0/x",
            "http://192.168.1.1:99999/x",
            "http://user@192.168.1.1/x",
            "ftp://192.168.1.1/x",
            "http://192.168.1.1/a b",
        ] {
            assert!(parse_url(bad, GW).is_err(), "{bad}");
        }
        let long = format!("http://192.168.1.1/{}", "a".repeat(300));
        assert!(parse_url(&long, GW).is_err());
        assert_eq!(resolve(&u, "/ctl/IPConn").expect("r").path, "/ctl/IPConn");
        assert_eq!(resolve(&u, "ctl/IPConn").expect("r").path, "/ctl/IPConn");
        let deep = parse_url("http://192.168.1.1:5000/dev/desc.xml", GW).expect("u");
        assert_eq!(resolve(&deep, "ctl").expect("r").path, "/dev/ctl");
        assert!(resolve(&u, "http://8.8.8.8/ctl").is_err());
        assert!(resolve(&u, "file:///etc/passwd").is_err());
    }

    const DESC: &str = r#"<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><device>
<deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
<controlURL>/ctl/L3F</controlURL></service></serviceList>
<deviceList><device><deviceList><device><serviceList>
<service><serviceType>urn:schemas-upnp-org:service:WANPPPConnection:1</serviceType>
<controlURL>/ctl/PPP</controlURL></service>
<service>
 <serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
 <serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
 <controlURL> /ctl/IPConn </controlURL>
</service></serviceList></device></deviceList></device></deviceList>
</device></root>"#;

    #[test]
    fn finds_the_wan_ip_connection_service() {
        let s = find_service(DESC, &loc()).expect("service");
        assert_eq!(
            s.service_type,
            "urn:schemas-upnp-org:service:WANIPConnection:1"
        );
        assert_eq!(s.control.path, "/ctl/IPConn");
        assert_eq!(s.control.port, 40000);
        // URLBase moves relative control URLs, but not off the gateway.
        let based = DESC.replace(
            "<device>",
            "<URLBase>http://192.168.1.1:5555/base/</URLBase><device>",
        );
        let s = find_service(&based, &loc()).expect("service");
        assert_eq!(s.control.port, 5555);
        let evil = DESC.replace("<device>", "<URLBase>http://10.9.9.9/</URLBase><device>");
        assert!(find_service(&evil, &loc()).is_err());
        let evil = DESC.replace("/ctl/IPConn", "http://10.9.9.9:80/x");
        assert!(find_service(&evil, &loc()).is_err());
        assert!(find_service("<root/>", &loc()).is_err());
        assert!(find_service("", &loc()).is_err());
        assert!(find_service("<service><serviceType>", &loc()).is_err());
    }

    fn service() -> Service {
        find_service(DESC, &loc()).expect("service")
    }

    #[test]
    fn soap_requests() {
        let add = Action::Add {
            external: 51821,
            internal: 51821,
            client: Ipv4Addr::new(192, 168, 1, 10),
            lease: 3600,
        };
        let req = String::from_utf8(soap_request(&service(), &add)).expect("utf8");
        assert!(req.starts_with("POST /ctl/IPConn HTTP/1.1\r\nHost: 192.168.1.1:40000\r\n"));
        assert!(req.contains(
            "SOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping\"\r\n"
        ));
        assert!(
            req.contains("<NewExternalPort>51821</NewExternalPort><NewProtocol>UDP</NewProtocol>")
        );
        assert!(req.contains("<NewInternalClient>192.168.1.10</NewInternalClient>"));
        assert!(req.contains("<NewLeaseDuration>3600</NewLeaseDuration>"));
        let (head, body) = req.split_once("\r\n\r\n").expect("split");
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let del = String::from_utf8(soap_request(&service(), &Action::Delete { external: 4000 }))
            .expect("utf8");
        assert!(del.contains("#DeletePortMapping\""));
        assert!(del.contains("<NewExternalPort>4000</NewExternalPort>"));
        let get = String::from_utf8(http_get(&loc())).expect("utf8");
        assert!(get.starts_with("GET /rootDesc.xml HTTP/1.1\r\n"));
        assert!(get.ends_with("\r\n\r\n"));
    }

    fn response(status: u16, body: &str) -> Response {
        let raw = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        parse_response(raw.as_bytes()).expect("response")
    }

    const FAULT_718: &str = "<s:Envelope><s:Body><s:Fault><detail><UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\">\
        <errorCode>718</errorCode><errorDescription>ConflictInMappingEntry</errorDescription></UPnPError></detail></s:Fault></s:Body></s:Envelope>";

    #[test]
    fn http_responses() {
        let r = response(200, "<x>1</x>");
        assert_eq!(r.body, "<x>1</x>");
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).expect("r").body, "abcdefg");
        let close = b"HTTP/1.0 200 OK\r\n\r\nall of it";
        assert_eq!(parse_response(close).expect("r").body, "all of it");
        for bad in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\n",
            b"SSH-2.0\r\n\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab",
        ] {
            assert!(
                parse_response(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn soap_answers() {
        let ok = response(
            200,
            "<s:Envelope><s:Body><u:GetExternalIPAddressResponse xmlns:u=\"x\">\
             <NewExternalIPAddress>11.0.0.3</NewExternalIPAddress></u:GetExternalIPAddressResponse></s:Body></s:Envelope>",
        );
        assert_eq!(external_ip(&ok), Ok(Ipv4Addr::new(11, 0, 0, 3)));
        let zero = response(200, "<NewExternalIPAddress>0.0.0.0</NewExternalIPAddress>");
        assert!(external_ip(&zero).is_err());
        let junk = response(
            200,
            "<NewExternalIPAddress>\x1b[2Jlol</NewExternalIPAddress>",
        );
        assert!(external_ip(&junk).expect_err("junk").contains("[2Jlol"));
        assert!(external_ip(&response(200, "")).is_err());
        let fault = response(500, FAULT_718);
        assert_eq!(
            upnp_error(&fault.body),
            Some((718, "ConflictInMappingEntry".into()))
        );
        assert_eq!(
            external_ip(&fault),
            Err("GetExternalIPAddress refused: UPnP error 718 ConflictInMappingEntry".into())
        );
        assert_eq!(
            element("<a:b x=\"1\">&lt;&amp;&gt;</a:b>", "b"),
            Some("<&>".into())
        );
        assert_eq!(element("<b/><b>v</b>", "b"), Some("v".into()));
        assert_eq!(element("<bb>v</bb>", "b"), None);
        assert_eq!(element("<b>unterminated", "b"), None);
        assert_eq!(element("<b", "b"), None);
        assert_eq!(element("</x:b><b>v</b>", "b"), Some("v".into()));
        assert_eq!(element("<<<b>v</b>", "b"), Some("v".into()));
        // Linear on hostile input: many `<` and one `>` at the very end.
        let hostile = format!("{}>", "<".repeat(MAX_RESPONSE));
        assert_eq!(element(&hostile, "b"), None);
    }

    #[test]
    fn add_port_mapping_outcomes() {
        assert_eq!(
            after_add(&response(200, ""), 1, 5000, 3600),
            AddOutcome::Mapped
        );
        let conflict = response(500, FAULT_718);
        assert_eq!(
            after_add(&conflict, 1, 5000, 3600),
            AddOutcome::OtherPort(5000)
        );
        assert_eq!(
            after_add(&conflict, 1, 80, 3600),
            AddOutcome::OtherPort(1024)
        );
        assert!(matches!(
            after_add(&conflict, PORT_ATTEMPTS, 5000, 3600),
            AddOutcome::GiveUp(r) if r.contains("718")
        ));
        let permanent = response(500, &FAULT_718.replace("718", "725"));
        assert_eq!(after_add(&permanent, 1, 5000, 3600), AddOutcome::Permanent);
        assert!(matches!(
            after_add(&permanent, 2, 5000, 0),
            AddOutcome::GiveUp(_)
        ));
        let denied = response(500, &FAULT_718.replace("718", "606"));
        assert!(
            matches!(after_add(&denied, 1, 5000, 3600), AddOutcome::GiveUp(r) if r.contains("606"))
        );
        assert_eq!(
            after_add(&response(404, "no"), 1, 5000, 3600),
            AddOutcome::GiveUp("AddPortMapping refused: HTTP 404".into())
        );
    }
}
