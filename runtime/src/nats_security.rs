//! The NATS link's secrets and certificates (gateway.md sections 7 and 9): where each comes
//! from ([`Sources`], the variables), and what reading them gives ([`Loaded`]: the rustls
//! client configuration and the core's [`NatsAuth`]).
//!
//! Read at start, where any failure stops the start with exit code 2 and a message naming the
//! variable and the file (`--check-config` reads them too, without connecting), and again on
//! SIGHUP, where a failure keeps what was loaded before and is logged: rotating a file must
//! never leave the gateway with no credentials at all. Nothing here prints a secret: the
//! secrets are the core's [`Secret`]s, and [`Sources::to_json`] shows only which are set.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipc_gateway_core::nats::auth::{parse_creds, NatsAuth, Secret};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use tracing::warn;

use crate::config::ConfigError;

/// A secret given in a variable, or the path of a file holding it (the `*_FILE` variants).
#[derive(Clone)]
pub enum SecretSource {
    Value(Secret),
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Value(_) => f.write_str("Value(***)"),
            SecretSource::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

/// One secret: which variable set it, and where it comes from.
#[derive(Debug, Clone)]
pub struct SecretSetting {
    /// The variable it came from (the plain one or its `_FILE` variant), for messages.
    pub var: &'static str,
    pub source: SecretSource,
}

/// Where the link's certificates and credentials come from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `CGW_IPC_NATS_TLS_CA`: PEM roots instead of the system store.
    pub ca: Option<PathBuf>,
    /// `CGW_IPC_NATS_TLS_CERT` + `CGW_IPC_NATS_TLS_KEY`: mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// `CGW_IPC_NATS_TLS_FIRST`.
    pub tls_first: bool,
    /// `CGW_IPC_NATS_CREDS`: an nsc `.creds` file.
    pub creds: Option<PathBuf>,
    pub nkey_seed: Option<SecretSetting>,
    pub token: Option<SecretSetting>,
    pub user: Option<String>,
    pub password: Option<SecretSetting>,
}

/// What reading the sources gave.
#[derive(Clone)]
pub struct Loaded {
    pub tls: Arc<ClientConfig>,
    pub auth: NatsAuth,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded")
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// Which roots verify the servers' certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roots {
    /// The system's store (only read when the link may need it: NATS enabled).
    System,
    /// None at all: for `--check-config` and stub mode, which only check the files.
    Skip,
}

impl Sources {
    /// A CA or a client certificate is configured: every connection uses TLS.
    pub fn tls_configured(&self) -> bool {
        self.ca.is_some() || self.cert.is_some()
    }

    /// Checks the combinations single values cannot: certificate and key together, a
    /// password with its user, and at most one credential method (which would win is not
    /// obvious, so none is guessed).
    pub fn check(&self) -> Result<(), ConfigError> {
        match (&self.cert, &self.key) {
            (Some(_), None) => {
                return Err(ConfigError(
                    "CGW_IPC_NATS_TLS_CERT is set without CGW_IPC_NATS_TLS_KEY: mutual TLS needs \
                     both the certificate and its private key"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError(
                    "CGW_IPC_NATS_TLS_KEY is set without CGW_IPC_NATS_TLS_CERT: mutual TLS needs \
                     both the certificate and its private key"
                        .into(),
                ))
            }
            _ => {}
        }
        match (&self.user, &self.password) {
            (Some(_), None) => {
                return Err(ConfigError(
                    "CGW_IPC_NATS_USER is set without CGW_IPC_NATS_PASSWORD (or \
                     CGW_IPC_NATS_PASSWORD_FILE)"
                        .into(),
                ))
            }
            (None, Some(p)) => {
                return Err(ConfigError(format!(
                    "{} is set without CGW_IPC_NATS_USER",
                    p.var
                )))
            }
            _ => {}
        }
        let methods: Vec<&str> = [
            self.creds.as_ref().map(|_| "CGW_IPC_NATS_CREDS"),
            self.nkey_seed.as_ref().map(|s| s.var),
            self.token.as_ref().map(|s| s.var),
            self.user.as_ref().map(|_| "CGW_IPC_NATS_USER"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if methods.len() > 1 {
            return Err(ConfigError(format!(
                "{} are all set: choose one NATS authentication method",
                methods.join(" and ")
            )));
        }
        Ok(())
    }

    /// Reads every file and checks every value: the error names the variable and the file.
    pub fn load(&self, roots: Roots) -> Result<Loaded, ConfigError> {
        self.check()?;
        Ok(Loaded {
            tls: Arc::new(self.tls_config(roots)?),
            auth: self.auth()?,
        })
    }

    /// The credentials alone (SIGHUP re-reads them apart from the certificates).
    pub fn auth(&self) -> Result<NatsAuth, ConfigError> {
        let auth = if let Some(path) = &self.creds {
            let text = read_text("CGW_IPC_NATS_CREDS", path)?;
            parse_creds(&text).map_err(|e| bad_file("CGW_IPC_NATS_CREDS", path, &e))?
        } else if let Some(seed) = &self.nkey_seed {
            let auth = NatsAuth::Nkey {
                seed: read_secret(seed)?,
            };
            auth.check().map_err(|e| bad_secret(seed, &e))?;
            auth
        } else if let Some(token) = &self.token {
            NatsAuth::Token(read_secret(token)?)
        } else if let (Some(user), Some(password)) = (&self.user, &self.password) {
            NatsAuth::UserPassword {
                user: user.clone(),
                password: read_secret(password)?,
            }
        } else {
            NatsAuth::None
        };
        Ok(auth)
    }

    /// The TLS settings alone (SIGHUP re-reads them apart from the credentials).
    pub fn tls_config(&self, roots: Roots) -> Result<ClientConfig, ConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut store = RootCertStore::empty();
        if let Some(path) = &self.ca {
            let certs = read_certs("CGW_IPC_NATS_TLS_CA", path)?;
            let (added, _ignored) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(bad_file(
                    "CGW_IPC_NATS_TLS_CA",
                    path,
                    &"none of its certificates can be used as a root",
                ));
            }
        } else if roots == Roots::System {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                warn!(event = "nats_tls_system_roots", component = "nats_resilience", error = %e,
                      "could not read part of the system's certificate store");
            }
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                warn!(
                    event = "nats_tls_system_roots",
                    component = "nats_resilience",
                    "the system's certificate store is empty: TLS servers cannot be verified \
                     (set CGW_IPC_NATS_TLS_CA)"
                );
            }
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError(format!("TLS setup failed: {e}")))?
            .with_root_certificates(store);
        match (&self.cert, &self.key) {
            (Some(cert_path), Some(key_path)) => {
                let certs = read_certs("CGW_IPC_NATS_TLS_CERT", cert_path)?;
                let key = read_key("CGW_IPC_NATS_TLS_KEY", key_path)?;
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    ConfigError(format!(
                        "CGW_IPC_NATS_TLS_KEY {:?} does not go with CGW_IPC_NATS_TLS_CERT {:?}: {e}",
                        key_path.display().to_string(),
                        cert_path.display().to_string()
                    ))
                })
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }

    /// For `--check-config` and `config_loaded`: which sources are set, never a secret.
    pub fn to_json(&self) -> serde_json::Value {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let secret = |s: &Option<SecretSetting>| {
            s.as_ref().map(|s| match &s.source {
                SecretSource::Value(_) => "***".to_string(),
                SecretSource::File(p) => format!("file {}", p.display()),
            })
        };
        let method = if self.creds.is_some() {
            "creds"
        } else if self.nkey_seed.is_some() {
            "nkey"
        } else if self.token.is_some() {
            "token"
        } else if self.user.is_some() {
            "user_password"
        } else {
            "none (or from the URL)"
        };
        serde_json::json!({
            "tls": {
                "ca": path(&self.ca).unwrap_or_else(|| "system".to_string()),
                "cert": path(&self.cert),
                "key": path(&self.key),
                "first": self.tls_first,
            },
            "auth": {
                "method": method,
                "creds": path(&self.creds),
                "nkey_seed": secret(&self.nkey_seed),
                "token": secret(&self.token),
                "user": self.user,
                "password": secret(&self.password),
            },
        })
    }
}

fn read_bytes(var: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| bad_file(var, path, &format!("cannot be read: {e}")))
}

fn read_text(var: &str, path: &Path) -> Result<String, ConfigError> {
    String::from_utf8(read_bytes(var, path)?).map_err(|_| bad_file(var, path, &"is not UTF-8 text"))
}

/// A secret's value: the variable's, or its file's content without the line end an editor
/// adds (a secret never ends in whitespace; a file written with `echo` would otherwise fail).
fn read_secret(s: &SecretSetting) -> Result<Secret, ConfigError> {
    let text = match &s.source {
        SecretSource::Value(v) => return Ok(v.clone()),
        SecretSource::File(path) => read_text(s.var, path)?,
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        let SecretSource::File(path) = &s.source else {
            unreachable!("values returned above")
        };
        return Err(bad_file(s.var, path, &"is empty"));
    }
    Ok(Secret::new(trimmed))
}

fn read_certs(var: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = read_bytes(var, path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(c),
        Ok(_) => Err(bad_file(var, path, &"holds no PEM certificate")),
        Err(e) => Err(bad_file(var, path, &format!("is not valid PEM: {e}"))),
    }
}

fn read_key(var: &str, path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let pem = read_bytes(var, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        bad_file(
            var,
            path,
            &format!("holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })
}

fn bad_file(var: &str, path: &Path, why: &dyn fmt::Display) -> ConfigError {
    ConfigError(format!("{var} {:?} {why}", path.display().to_string()))
}

fn bad_secret(s: &SecretSetting, why: &dyn fmt::Display) -> ConfigError {
    match &s.source {
        SecretSource::File(path) => bad_file(s.var, path, &format_args!("is {why}")),
        SecretSource::Value(_) => ConfigError(format!("{} is {why}", s.var)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory of its own per test, removed at the end.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir()
                .join(format!("cgw-nats-security-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn file(&self, name: &str, content: &[u8]) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, content).unwrap();
            p
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn err(s: &Sources) -> String {
        s.load(Roots::Skip).unwrap_err().0
    }

    #[test]
    fn missing_or_unreadable_files_name_the_variable_and_the_file() {
        let dir = Scratch::new("missing");
        let nowhere = dir.0.join("nowhere.pem");
        for (sources, var) in [
            (
                Sources {
                    ca: Some(nowhere.clone()),
                    ..Sources::default()
                },
                "CGW_IPC_NATS_TLS_CA",
            ),
            (
                Sources {
                    cert: Some(nowhere.clone()),
                    key: Some(dir.file("k.pem", b"")),
                    ..Sources::default()
                },
                "CGW_IPC_NATS_TLS_CERT",
            ),
            (
                Sources {
                    creds: Some(nowhere.clone()),
                    ..Sources::default()
                },
                "CGW_IPC_NATS_CREDS",
            ),
            (
                Sources {
                    token: Some(SecretSetting {
                        var: "CGW_IPC_NATS_TOKEN_FILE",
                        source: SecretSource::File(nowhere.clone()),
                    }),
                    ..Sources::default()
                },
                "CGW_IPC_NATS_TOKEN_FILE",
            ),
        ] {
            let e = err(&sources);
            assert!(
                e.contains(var) && e.contains(&nowhere.display().to_string()),
                "{e}"
            );
            assert!(e.contains("cannot be read"), "{e}");
        }
    }

    #[test]
    fn files_that_are_not_what_they_should_be() {
        let dir = Scratch::new("garbage");
        let junk = dir.file("junk.pem", b"hello, not a certificate\n");
        let e = err(&Sources {
            ca: Some(junk.clone()),
            ..Sources::default()
        });
        assert!(
            e.contains("CGW_IPC_NATS_TLS_CA") && e.contains("no PEM certificate"),
            "{e}"
        );
        let cert = dir.file("c.pem", TEST_CERT.as_bytes());
        let e = err(&Sources {
            cert: Some(cert),
            key: Some(junk),
            ..Sources::default()
        });
        assert!(
            e.contains("CGW_IPC_NATS_TLS_KEY") && e.contains("private key"),
            "{e}"
        );
        let seed = dir.file("seed", b"SUAnotaseed\n");
        let e = err(&Sources {
            nkey_seed: Some(SecretSetting {
                var: "CGW_IPC_NATS_NKEY_SEED_FILE",
                source: SecretSource::File(seed.clone()),
            }),
            ..Sources::default()
        });
        assert!(
            e.contains("CGW_IPC_NATS_NKEY_SEED_FILE")
                && e.contains(&seed.display().to_string())
                && e.contains("not a valid nkey seed")
                && !e.contains("SUAnotaseed"),
            "{e}"
        );
        let creds = dir.file("u.creds", b"-----BEGIN NATS USER JWT-----\neyJ\n");
        let e = err(&Sources {
            creds: Some(creds),
            ..Sources::default()
        });
        assert!(
            e.contains("CGW_IPC_NATS_CREDS") && e.contains("closing line"),
            "{e}"
        );
        let empty = dir.file("empty", b"\n");
        let e = err(&Sources {
            token: Some(SecretSetting {
                var: "CGW_IPC_NATS_TOKEN_FILE",
                source: SecretSource::File(empty),
            }),
            ..Sources::default()
        });
        assert!(e.contains("is empty"), "{e}");
    }

    /// A key that is not the certificate's is refused at start, naming both variables.
    #[test]
    fn a_key_that_does_not_match_its_certificate() {
        let dir = Scratch::new("mismatch");
        let cert = dir.file("c.pem", TEST_CERT.as_bytes());
        let other = dir.file("k.pem", OTHER_KEY.as_bytes());
        let e = err(&Sources {
            cert: Some(cert.clone()),
            key: Some(other),
            ..Sources::default()
        });
        assert!(
            e.contains("CGW_IPC_NATS_TLS_KEY") && e.contains("CGW_IPC_NATS_TLS_CERT"),
            "{e}"
        );
        let key = dir.file("right.pem", TEST_KEY.as_bytes());
        let loaded = Sources {
            cert: Some(cert),
            key: Some(key),
            ca: Some(dir.file("ca.pem", TEST_CERT.as_bytes())),
            ..Sources::default()
        }
        .load(Roots::Skip)
        .unwrap();
        assert!(loaded.tls.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn combinations_are_checked() {
        let dir = Scratch::new("combos");
        let key = dir.file("k.pem", TEST_KEY.as_bytes());
        let e = err(&Sources {
            key: Some(key),
            ..Sources::default()
        });
        assert!(
            e.contains("CGW_IPC_NATS_TLS_KEY is set without CGW_IPC_NATS_TLS_CERT"),
            "{e}"
        );
        let token = || {
            Some(SecretSetting {
                var: "CGW_IPC_NATS_TOKEN",
                source: SecretSource::Value(Secret::new("t")),
            })
        };
        let e = err(&Sources {
            token: token(),
            creds: Some(dir.0.join("x.creds")),
            ..Sources::default()
        });
        assert!(
            e.contains("CGW_IPC_NATS_CREDS and CGW_IPC_NATS_TOKEN are all set"),
            "{e}"
        );
        let e = err(&Sources {
            user: Some("u".into()),
            ..Sources::default()
        });
        assert!(e.contains("CGW_IPC_NATS_PASSWORD"), "{e}");
    }

    /// Secrets from files lose the editor's line end; JSON and Debug show none of them.
    #[test]
    fn secrets_are_read_trimmed_and_never_shown() {
        let dir = Scratch::new("secrets");
        let pw = dir.file("pw", b"pa55word\n");
        let s = Sources {
            user: Some("alice".into()),
            password: Some(SecretSetting {
                var: "CGW_IPC_NATS_PASSWORD_FILE",
                source: SecretSource::File(pw),
            }),
            ..Sources::default()
        };
        let loaded = s.load(Roots::Skip).unwrap();
        assert_eq!(
            loaded.auth,
            NatsAuth::UserPassword {
                user: "alice".into(),
                password: Secret::new("pa55word"),
            }
        );
        let shown = format!("{} {s:?} {loaded:?}", s.to_json());
        assert!(!shown.contains("pa55word"), "{shown}");
        let t = Sources {
            token: Some(SecretSetting {
                var: "CGW_IPC_NATS_TOKEN",
                source: SecretSource::Value(Secret::new("t0ken-value")),
            }),
            ..Sources::default()
        };
        let shown = format!("{} {t:?}", t.to_json());
        assert!(
            !shown.contains("t0ken-value") && shown.contains("***"),
            "{shown}"
        );
    }

    /// A self-signed certificate and its key (ECDSA P-256, CN=test), and another key; fixtures
    /// made once with openssl (testdata/tls/README.md), not credentials.
    const TEST_CERT: &str = include_str!("../testdata/tls/cert.pem");
    const TEST_KEY: &str = include_str!("../testdata/tls/key.pem");
    const OTHER_KEY: &str = include_str!("../testdata/tls/other-key.pem");
}
