//! The NATS server pool and reconnect backoff (gateway.md section 2).
//!
//! ```text
//!  configured URLs ──shuffle(seed)──▶ rotation ◀── INFO connect_urls: learned servers added,
//!                                        │          and dropped when a later INFO omits them
//!   take_next(): front server, moved to the back (so the one just lost is tried last)
//!   delay_before_next(): 0 inside a pass; after a whole pass failed, d/2 + rand(0..=d/2)
//!                        with d = 100 ms · 2^(pass-1), at most 2 s; reset on success
//! ```
//!
//! Backoff is per pass through the pool, as nats.go's `doReconnect` sleeps only once it has
//! tried every server: with several servers, a refused connection costs nothing, so a server
//! that comes back is reached within one delay (≤ 2 s) plus the handshake.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use crate::rng::Rng;

/// Port used when a server URL names none (nats-server's default).
pub const DEFAULT_PORT: u16 = 4222;

/// One server address with the credentials to use on it.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerUrl {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub pass: Option<String>,
    pub token: Option<String>,
    /// The URL said `tls://`: TLS is required (for every server, as nats.go does once any
    /// configured URL asks for it; [`crate::nats_config::NatsConfig::tls_wanted`]).
    pub tls: bool,
    /// The name its TLS certificate is checked against, when not `host`: set for a server
    /// learned from INFO under an IP address through a server configured by name (see
    /// [`ServerPool::apply_connect_urls`]).
    pub tls_name: Option<String>,
}

impl ServerUrl {
    /// Parses `nats://user:pass@host:port`, `nats://token@host:port`, `nats://host:port`,
    /// `host:port` or `host` (port 4222); `tls://` instead of `nats://` requires TLS. IPv6
    /// hosts are written in brackets.
    pub fn parse(entry: &str) -> Result<ServerUrl, ServerUrlError> {
        let bad = |reason: &'static str| ServerUrlError {
            entry: mask_entry(entry.trim()),
            reason,
        };
        let entry_trim = entry.trim();
        if entry_trim.is_empty() {
            return Err(bad("empty server entry"));
        }
        let (rest, tls) = match entry_trim.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("nats") => (rest, false),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("tls") => (rest, true),
            Some(_) => return Err(bad("the scheme must be nats:// or tls://")),
            None => (entry_trim, false),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(bad("a server URL has no path, query or fragment"));
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (user, pass, token) = match userinfo {
            None => (None, None, None),
            Some("") => return Err(bad("empty credentials before @")),
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (
                    Some(percent_decode(user).ok_or(bad("bad %-escape in the user"))?),
                    Some(percent_decode(pass).ok_or(bad("bad %-escape in the password"))?),
                    None,
                ),
                None => (
                    None,
                    None,
                    Some(percent_decode(u).ok_or(bad("bad %-escape in the token"))?),
                ),
            },
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or(bad("unclosed [ in the host"))?;
            match after {
                "" => (host, None),
                p => (host, Some(p.strip_prefix(':').ok_or(bad("junk after ]"))?)),
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        if host.contains(char::is_whitespace) {
            return Err(bad("whitespace in the host"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(bad("the port must be a number from 1 to 65535")),
            },
        };
        Ok(ServerUrl {
            host: host.to_owned(),
            port,
            user,
            pass,
            token,
            tls,
            tls_name: None,
        })
    }

    /// The name the server's certificate must carry: the URL's host, or for a server learned
    /// under an IP address, the configured host it was learned through.
    pub fn server_name(&self) -> &str {
        self.tls_name.as_deref().unwrap_or(&self.host)
    }

    /// Parses a comma-separated list; the error names the first bad entry (credentials
    /// masked).
    pub fn parse_list(list: &str) -> Result<Vec<ServerUrl>, ServerUrlError> {
        list.split(',').map(ServerUrl::parse).collect()
    }

    fn same_address(&self, other: &ServerUrl) -> bool {
        self.port == other.port && self.host.eq_ignore_ascii_case(&other.host)
    }

    /// Userinfo in the URL: it wins over the configured credentials for this server.
    pub fn has_credentials(&self) -> bool {
        self.user.is_some() || self.pass.is_some() || self.token.is_some()
    }
}

/// Credentials are always masked: server URLs end up in logs (gateway.md section 6).
impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.tls { "tls://" } else { "nats://" })?;
        if self.has_credentials() {
            f.write_str("***@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A server entry that is not a NATS URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrlError {
    /// The entry, credentials masked.
    pub entry: String,
    pub reason: &'static str,
}

impl fmt::Display for ServerUrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad NATS server entry {:?}: {}", self.entry, self.reason)
    }
}

impl std::error::Error for ServerUrlError {}

/// The entry with anything before `@` replaced, for error messages.
fn mask_entry(entry: &str) -> String {
    match (entry.split_once("://"), entry.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://***@{host}"),
        (None, Some((_, host))) => format!("***@{host}"),
        _ => entry.to_owned(),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = (bytes.next()? as char).to_digit(16)?;
            let lo = (bytes.next()? as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// The reconnect delay schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        }
    }
}

impl Backoff {
    /// The un-jittered delay before pass `pass` (1-based): `initial · 2^(pass-1)`, capped.
    pub fn ceiling(&self, pass: u32) -> Duration {
        let factor = 1u32.checked_shl(pass.saturating_sub(1)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The jittered delay: half fixed, half random, so many gateways restarted together do
    /// not reconnect in lockstep, yet none waits less than half the schedule.
    pub fn delay(&self, pass: u32, rng: &mut Rng) -> Duration {
        let d = u64::try_from(self.ceiling(pass).as_nanos()).unwrap_or(u64::MAX);
        let fixed = d / 2;
        Duration::from_nanos(fixed + rng.below(d - fixed + 1))
    }
}

#[derive(Debug, Clone)]
struct PoolServer {
    url: ServerUrl,
    /// Learned from INFO `connect_urls`, not configured: may be dropped again.
    learned: bool,
}

/// What an INFO changed in the pool, for logs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PoolChange {
    pub added: Vec<ServerUrl>,
    pub removed: Vec<ServerUrl>,
}

/// The servers to try, in rotation order, and the backoff state.
#[derive(Debug)]
pub struct ServerPool {
    servers: Vec<PoolServer>,
    backoff: Backoff,
    /// Attempts made in the current pass.
    tried_in_pass: usize,
    /// Passes that ended without a connection since the last success.
    failed_passes: u32,
}

impl ServerPool {
    /// A pool of the configured servers, shuffled with the seeded RNG so that a fleet of
    /// gateways spreads over the cluster (nats.go shuffles too, unless told not to).
    pub fn new(configured: Vec<ServerUrl>, backoff: Backoff, rng: &mut Rng) -> ServerPool {
        let mut servers: Vec<PoolServer> = configured
            .into_iter()
            .map(|url| PoolServer {
                url,
                learned: false,
            })
            .collect();
        for i in (1..servers.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            servers.swap(i, j);
        }
        ServerPool {
            servers,
            backoff,
            tried_in_pass: 0,
            failed_passes: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// The servers in the order they will be tried.
    pub fn servers(&self) -> impl Iterator<Item = &ServerUrl> {
        self.servers.iter().map(|s| &s.url)
    }

    /// How long to wait before the next attempt: nothing while the current pass has servers
    /// left, a backoff delay once all were tried.
    pub fn delay_before_next(&mut self, rng: &mut Rng) -> Duration {
        if self.tried_in_pass < self.servers.len() {
            return Duration::ZERO;
        }
        self.tried_in_pass = 0;
        self.failed_passes = self.failed_passes.saturating_add(1);
        self.backoff.delay(self.failed_passes, rng)
    }

    /// The server to try now; it moves to the back of the rotation.
    pub fn take_next(&mut self) -> Option<ServerUrl> {
        if self.servers.is_empty() {
            return None;
        }
        let s = self.servers.remove(0);
        let url = s.url.clone();
        self.servers.push(s);
        self.tried_in_pass += 1;
        Some(url)
    }

    /// A connection reached Connected: the next loss starts a fresh, immediate pass.
    pub fn connected(&mut self) {
        self.tried_in_pass = 0;
        self.failed_passes = 0;
    }

    /// Applies an INFO's `connect_urls` (`host:port`, usually without a scheme). New ones are
    /// added with the credentials of `current` (same cluster, same accounts); learned ones the
    /// list omits are dropped, except `current`.
    ///
    /// TLS name: a cluster advertises its members by IP address (nats-server's default
    /// `connect_urls` are the routes' interface addresses), while its certificates name the
    /// DNS name clients are given, rarely the addresses. So, as nats.go does (`tlsName` in
    /// its server pool), a server announced as an IP address through a server configured by
    /// name is checked against that name; one announced by name is checked against its own
    /// name. async-nats checks each address's own host, which makes such a cluster's
    /// learned servers unusable over TLS. Configured servers are never dropped. An
    /// empty list changes nothing: servers with advertising disabled send none, and nats.go
    /// keeps its pool then too.
    pub fn apply_connect_urls(&mut self, urls: &[String], current: &ServerUrl) -> PoolChange {
        let mut change = PoolChange::default();
        if urls.is_empty() {
            return change;
        }
        let announced: Vec<ServerUrl> = urls
            .iter()
            .filter_map(|u| ServerUrl::parse(u).ok())
            .map(|mut u| {
                if !u.has_credentials() {
                    u.user.clone_from(&current.user);
                    u.pass.clone_from(&current.pass);
                    u.token.clone_from(&current.token);
                }
                u.tls |= current.tls;
                let named = |h: &str| h.trim_matches(['[', ']']).parse::<IpAddr>().is_err();
                if !named(&u.host) && named(current.server_name()) {
                    u.tls_name = Some(current.server_name().to_owned());
                }
                u
            })
            .collect();
        let before = self.servers.len();
        self.servers.retain(|s| {
            let keep = !s.learned
                || s.url.same_address(current)
                || announced.iter().any(|a| a.same_address(&s.url));
            if !keep {
                change.removed.push(s.url.clone());
            }
            keep
        });
        // A pass in progress must still end after the servers that are left.
        self.tried_in_pass = self
            .tried_in_pass
            .saturating_sub(before - self.servers.len());
        // New servers go just before `current` (the server just taken, at the back of the
        // rotation), so that when it fails they are tried before it is tried again.
        for url in announced {
            if !self.servers.iter().any(|s| s.url.same_address(&url)) {
                change.added.push(url.clone());
                let at = self
                    .servers
                    .iter()
                    .position(|s| s.url.same_address(current))
                    .unwrap_or(self.servers.len());
                self.servers.insert(at, PoolServer { url, learned: true });
            }
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member announced by IP through a server configured by name is checked against that
    /// name (nats.go's `tlsName`); one announced by name, or learned through an IP, against
    /// its own host. TLS carries over from the server it was learned through.
    #[test]
    fn learned_servers_keep_the_configured_tls_name() {
        let mut rng = Rng::new(1);
        let named = ServerUrl::parse("tls://nats.example:4222").unwrap();
        let mut pool = ServerPool::new(vec![named], Backoff::default(), &mut rng);
        let current = pool.take_next().unwrap();
        let urls = ["10.0.0.2:4222", "[fd00::3]:4222", "n4.example:4222"].map(String::from);
        pool.apply_connect_urls(&urls, &current);
        let names: Vec<(String, String, bool)> = pool
            .servers()
            .map(|u| (u.host.clone(), u.server_name().to_owned(), u.tls))
            .collect();
        assert_eq!(
            names,
            [
                ("10.0.0.2".into(), "nats.example".into(), true),
                ("fd00::3".into(), "nats.example".into(), true),
                ("n4.example".into(), "n4.example".into(), true),
                ("nats.example".into(), "nats.example".into(), true),
            ]
        );
        // Learned through an IP: nothing better to check than each one's own address.
        let mut pool = ServerPool::new(vec![url("10.0.0.1:4222")], Backoff::default(), &mut rng);
        let current = pool.take_next().unwrap();
        pool.apply_connect_urls(&["10.0.0.2:4222".to_owned()], &current);
        assert_eq!(pool.servers().next().unwrap().server_name(), "10.0.0.2");
    }

    /// Found by the tier-2 simulation: a learned server was appended behind the server just
    /// taken, so when that one died it was tried again first, costing a connect timeout.
    #[test]
    fn learned_servers_come_before_the_server_just_taken() {
        let mut rng = Rng::new(1);
        let a = ServerUrl::parse("a:1").unwrap();
        let mut pool = ServerPool::new(vec![a], Backoff::default(), &mut rng);
        let current = pool.take_next().unwrap();
        pool.apply_connect_urls(&["b:2".to_owned(), "c:3".to_owned()], &current);
        let order: Vec<String> = pool.servers().map(|u| u.host.clone()).collect();
        assert_eq!(order, ["b", "c", "a"]);
        assert_eq!(
            pool.take_next().unwrap().host,
            "b",
            "failover goes to a learned server"
        );
    }

    #[test]
    fn url_forms() {
        let u = ServerUrl::parse("nats://alice:s%40cret@nats.example:4333").unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.user.as_deref(),
                u.pass.as_deref()
            ),
            ("nats.example", 4333, Some("alice"), Some("s@cret"))
        );
        assert_eq!(u.to_string(), "nats://***@nats.example:4333");
        let t = ServerUrl::parse("nats://tok@h:1").unwrap();
        assert_eq!((t.token.as_deref(), t.user), (Some("tok"), None));
        let p = ServerUrl::parse("10.0.0.1:4222").unwrap();
        assert_eq!((p.host.as_str(), p.port, p.token), ("10.0.0.1", 4222, None));
        assert_eq!(ServerUrl::parse("h").unwrap().port, 4222);
        assert_eq!(
            ServerUrl::parse("[::1]:5").unwrap().to_string(),
            "nats://[::1]:5"
        );
    }

    #[test]
    fn bad_entries_are_named_with_credentials_masked() {
        let e = ServerUrl::parse_list("nats://a:4222, nats://u:pw@h:99999").unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad NATS server entry \"nats://***@h:99999\": the port must be a number from 1 to 65535"
        );
        assert_eq!(
            ServerUrl::parse("ws://h:1").unwrap_err().reason,
            "the scheme must be nats:// or tls://"
        );
        let t = ServerUrl::parse("TLS://u:p@h:1").unwrap();
        assert!(t.tls && t.has_credentials());
        assert_eq!(t.to_string(), "tls://***@h:1");
        assert!(!ServerUrl::parse("nats://h:1").unwrap().tls);
        assert_eq!(
            ServerUrl::parse("").unwrap_err().reason,
            "empty server entry"
        );
        assert_eq!(
            ServerUrl::parse("nats://:4222").unwrap_err().reason,
            "empty host"
        );
        assert!(ServerUrl::parse("h:").is_err());
        assert!(ServerUrl::parse("h:x").is_err());
    }

    #[test]
    fn backoff_ceiling_doubles_to_the_cap() {
        let b = Backoff::default();
        let ms: Vec<u128> = (1..=8).map(|p| b.ceiling(p).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(b.ceiling(200), Duration::from_secs(2));
    }

    fn url(entry: &str) -> ServerUrl {
        ServerUrl::parse(entry).unwrap()
    }

    /// A port is 1 to 65535 written in plain digits (u16's parser alone would take "+1").
    #[test]
    fn ports_are_plain_digits_from_1_to_65535() {
        for bad in ["h:0", "h:+1", "h:65536", "h:-1", "h: 1"] {
            let e = ServerUrl::parse(bad).unwrap_err();
            assert_eq!(
                e.reason, "the port must be a number from 1 to 65535",
                "{bad}"
            );
        }
        assert_eq!(url("h:1").port, 1);
        assert_eq!(url("h:65535").port, 65535);
    }

    /// Credentials of every form count and are masked, in URLs and in error messages.
    #[test]
    fn credentials_are_recognised_and_masked_everywhere() {
        assert!(!url("h:1").has_credentials());
        assert!(url("nats://tok@h:1").has_credentials());
        assert!(url("nats://u:p@h:1").has_credentials());
        let user_only = ServerUrl {
            pass: None,
            ..url("nats://u:p@h:1")
        };
        assert!(user_only.has_credentials());
        let pass_only = ServerUrl {
            user: None,
            ..url("nats://u:p@h:1")
        };
        assert!(pass_only.has_credentials());
        assert_eq!(url("nats://tok@h:1").to_string(), "nats://***@h:1");
        assert_eq!(format!("{:?}", url("nats://u:p@h:1")), "nats://***@h:1");
        let e = ServerUrl::parse("u:secret@h:bad").unwrap_err();
        assert_eq!(e.entry, "***@h:bad");
        assert!(!e.to_string().contains("secret"));
        let e = ServerUrl::parse("nats://u:secret@h:bad").unwrap_err();
        assert_eq!(e.entry, "nats://***@h:bad");
    }

    /// %-escapes decode to the byte they name, in users, passwords and tokens.
    #[test]
    fn percent_escapes_decode() {
        let u = url("nats://us%40er:p%3A%7Ess@h");
        assert_eq!(
            (u.user.as_deref(), u.pass.as_deref()),
            (Some("us@er"), Some("p:~ss"))
        );
        assert_eq!(url("nats://t%41k@h").token.as_deref(), Some("tAk"));
        assert!(ServerUrl::parse("nats://t%4@h").is_err());
        assert!(ServerUrl::parse("nats://t%zz@h").is_err());
    }

    /// The same address is host (any case) and port; credentials do not matter.
    #[test]
    fn same_address_ignores_host_case_and_credentials() {
        assert!(url("Nats-A:4222").same_address(&url("nats://u:p@nats-a:4222")));
        assert!(!url("nats-a:4222").same_address(&url("nats-a:4223")));
        assert!(!url("nats-a:4222").same_address(&url("nats-b:4222")));
    }

    /// Every jittered delay lies in [d/2, d] and the random half really varies.
    #[test]
    fn jittered_delays_stay_within_half_to_whole_and_spread() {
        let b = Backoff::default();
        let mut rng = Rng::new(9);
        for pass in 1..=7 {
            let d = b.ceiling(pass);
            let delays: Vec<Duration> = (0..400).map(|_| b.delay(pass, &mut rng)).collect();
            assert!(delays.iter().all(|x| *x >= d / 2 && *x <= d), "pass {pass}");
            let (lo, hi) = (*delays.iter().min().unwrap(), *delays.iter().max().unwrap());
            assert!(
                lo < d * 55 / 100 && hi > d * 95 / 100,
                "pass {pass}: {lo:?}..{hi:?}"
            );
        }
    }

    /// INFO connect_urls: learned servers come and go, configured ones and the current one
    /// stay, and a pass in progress still ends after the servers that remain.
    #[test]
    fn connect_urls_keep_configured_and_current_and_adjust_the_pass() {
        let mut rng = Rng::new(1);
        let a = url("nats://u:p@a:4222");
        let mut pool = ServerPool::new(vec![a.clone()], Backoff::default(), &mut rng);
        assert!(!pool.is_empty());
        assert!(ServerPool::new(vec![], Backoff::default(), &mut rng).is_empty());
        // INFO comes from the server just taken.
        assert_eq!(pool.take_next().unwrap().host, "a");
        let change = pool.apply_connect_urls(&["b:4222".into(), "c:4222".into()], &a);
        assert_eq!(change.added.len(), 2);
        let b = pool.servers().find(|s| s.host == "b").unwrap().clone();
        assert_eq!(
            b.user.as_deref(),
            Some("u"),
            "learned servers take the current credentials"
        );
        assert_eq!(pool.take_next().unwrap().host, "b");
        // Connected to b, which now announces only itself: c goes, a (configured) stays.
        let change = pool.apply_connect_urls(&["b:4222".into()], &b);
        assert_eq!(
            change
                .removed
                .iter()
                .map(|s| s.host.as_str())
                .collect::<Vec<_>>(),
            ["c"]
        );
        assert_eq!(pool.len(), 2);
        assert_eq!(
            pool.delay_before_next(&mut rng),
            Duration::ZERO,
            "one server of the pass is left"
        );
        // b is current: an INFO that omits it does not drop it.
        let change = pool.apply_connect_urls(&["d:4222".into()], &b);
        assert!(change.removed.is_empty(), "{change:?}");
        assert_eq!(pool.len(), 3);
        // An empty list changes nothing.
        assert_eq!(pool.apply_connect_urls(&[], &b), PoolChange::default());
    }
}
