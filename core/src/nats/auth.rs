//! Credentials for the NATS CONNECT (gateway.md section 9): user + password, token, nkey
//! (the INFO `nonce` signed with the ed25519 seed), and JWT + nkey from an `nsc` `.creds`
//! file. Pure computation, so the session can sign a nonce in the core and the simulations and
//! tests see exactly what goes on the wire; reading files is the shell's job.
//!
//! Every secret is a [`Secret`], whose `Debug` prints `***`, so a config or an options value
//! that reaches a log shows which credentials exist and never what they are.

use std::fmt;

use data_encoding::BASE64URL_NOPAD;
use nkeys::KeyPair;

use crate::nats_codec::ConnectOptions;

/// A credential's text. `Debug` and `Display` mask it; only [`Secret::expose`] shows it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    /// The secret itself, for the CONNECT line and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The credentials configured for every server (section 7's variables). Credentials in a
/// server URL's userinfo win over these for that server, as in nats.go, where the URL's user
/// and password replace the options'.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NatsAuth {
    #[default]
    None,
    UserPassword {
        user: String,
        password: Secret,
    },
    Token(Secret),
    /// An nkey seed (`SU...`); its public key goes in CONNECT `nkey`, the signed nonce in `sig`.
    Nkey {
        seed: Secret,
    },
    /// A user JWT and its nkey seed, as in an `nsc` `.creds` file; CONNECT carries `jwt` and
    /// `sig` (the server finds the public key in the JWT).
    Jwt {
        jwt: Secret,
        seed: Secret,
    },
}

impl NatsAuth {
    /// The method's name for logs and the audit log (`nats_authenticated`): never the secret.
    pub fn method(&self) -> &'static str {
        match self {
            NatsAuth::None => "none",
            NatsAuth::UserPassword { .. } => "user_password",
            NatsAuth::Token(_) => "token",
            NatsAuth::Nkey { .. } => "nkey",
            NatsAuth::Jwt { .. } => "creds",
        }
    }

    /// Checks what can be checked before connecting: a seed must be a user, account or
    /// server nkey seed that decodes (so a typo stops the start, not every connection).
    pub fn check(&self) -> Result<(), AuthError> {
        match self {
            NatsAuth::Jwt { jwt, .. } if jwt.expose().trim().is_empty() => Err(AuthError::EmptyJwt),
            NatsAuth::Nkey { seed } | NatsAuth::Jwt { seed, .. } => key_pair(seed).map(|_| ()),
            _ => Ok(()),
        }
    }

    /// Fills CONNECT's credential fields; `nonce` is the INFO's. Without a nonce, an nkey or
    /// JWT has nothing to sign: the fields go without `sig` and the server decides (it
    /// always sends a nonce when it accepts nkeys, so that one refuses).
    pub fn apply(
        &self,
        options: &mut ConnectOptions,
        nonce: Option<&str>,
    ) -> Result<(), AuthError> {
        match self {
            NatsAuth::None => {}
            NatsAuth::UserPassword { user, password } => {
                options.user = Some(user.clone());
                options.pass = Some(password.expose().to_owned());
            }
            NatsAuth::Token(token) => options.auth_token = Some(token.expose().to_owned()),
            NatsAuth::Nkey { seed } => {
                let kp = key_pair(seed)?;
                options.nkey = Some(kp.public_key());
                options.sig = nonce.map(|n| sign(&kp, n)).transpose()?;
            }
            NatsAuth::Jwt { jwt, seed } => {
                let kp = key_pair(seed)?;
                options.jwt = Some(jwt.expose().to_owned());
                options.sig = nonce.map(|n| sign(&kp, n)).transpose()?;
            }
        }
        Ok(())
    }
}

/// What is wrong with a credential; the text names no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// The seed does not decode as an nkey seed (`nkeys` says why).
    BadSeed(String),
    /// Signing the nonce failed.
    Sign(String),
    EmptyJwt,
    /// A `.creds` file without a JWT block or a seed block.
    BadCreds(&'static str),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::BadSeed(why) => write!(f, "not a valid nkey seed ({why})"),
            AuthError::Sign(why) => write!(f, "cannot sign the server's nonce ({why})"),
            AuthError::EmptyJwt => f.write_str("the user JWT is empty"),
            AuthError::BadCreds(why) => write!(f, "not a NATS .creds file: {why}"),
        }
    }
}

impl std::error::Error for AuthError {}

fn key_pair(seed: &Secret) -> Result<KeyPair, AuthError> {
    // nkeys' error text describes the encoding problem, never the seed.
    KeyPair::from_seed(seed.expose().trim()).map_err(|e| AuthError::BadSeed(e.to_string()))
}

/// The nonce signed with the seed, base64url without padding, as nats.go and async-nats send it.
fn sign(kp: &KeyPair, nonce: &str) -> Result<String, AuthError> {
    kp.sign(nonce.as_bytes())
        .map(|sig| BASE64URL_NOPAD.encode(&sig))
        .map_err(|e| AuthError::Sign(e.to_string()))
}

/// The JWT and the seed of an `nsc` `.creds` file:
///
/// ```text
/// -----BEGIN NATS USER JWT-----
/// eyJ0eXAiOi...
/// ------END NATS USER JWT------
///
/// ************************* IMPORTANT *************************
/// ...
/// -----BEGIN USER NKEY SEED-----
/// SUAM...
/// ------END USER NKEY SEED------
/// ```
///
/// As nats.go's `credsFromFile`: a block is a line of at least three dashes, one line of
/// content, and another line of dashes; the first block is the JWT, the second the seed; any
/// other text (the warning banner) is ignored.
pub fn parse_creds(text: &str) -> Result<NatsAuth, AuthError> {
    let mut blocks = Vec::with_capacity(2);
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if !is_fence(line) {
            continue;
        }
        let Some(content) = lines.by_ref().find(|l| !l.is_empty()) else {
            break;
        };
        if is_fence(content) {
            return Err(AuthError::BadCreds("an empty block"));
        }
        match lines.by_ref().find(|l| !l.is_empty()) {
            Some(end) if is_fence(end) => blocks.push(content.to_owned()),
            _ => return Err(AuthError::BadCreds("a block without its closing line")),
        }
        if blocks.len() == 2 {
            break;
        }
    }
    let mut blocks = blocks.into_iter();
    let jwt = blocks.next().ok_or(AuthError::BadCreds(
        "no JWT block (-----BEGIN NATS USER JWT-----)",
    ))?;
    let seed = blocks.next().ok_or(AuthError::BadCreds(
        "no seed block (-----BEGIN USER NKEY SEED-----)",
    ))?;
    let auth = NatsAuth::Jwt {
        jwt: Secret::new(jwt),
        seed: Secret::new(seed),
    };
    auth.check()?;
    Ok(auth)
}

fn is_fence(line: &str) -> bool {
    line.starts_with("---") && line.ends_with("---")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nats_codec::ServerInfo;

    /// A user seed made once with `nkeys::KeyPair::new_user()`; a fixture, not a credential.
    fn user() -> KeyPair {
        KeyPair::new_user()
    }

    fn options() -> ConnectOptions {
        ConnectOptions::for_server("g", &ServerInfo::default())
    }

    #[test]
    fn user_password_and_token_fill_their_fields() {
        let mut o = options();
        NatsAuth::UserPassword {
            user: "alice".into(),
            password: Secret::new("pw"),
        }
        .apply(&mut o, None)
        .unwrap();
        assert_eq!(
            (o.user.as_deref(), o.pass.as_deref()),
            (Some("alice"), Some("pw"))
        );
        assert!(o.auth_token.is_none() && o.nkey.is_none() && o.jwt.is_none());
        let mut o = options();
        NatsAuth::Token(Secret::new("t0k"))
            .apply(&mut o, None)
            .unwrap();
        assert_eq!(o.auth_token.as_deref(), Some("t0k"));
        assert!(o.user.is_none() && o.sig.is_none());
    }

    /// The signature in CONNECT verifies against the public key in CONNECT, over the nonce's
    /// bytes, with the encoding nats-server decodes (base64url, no padding).
    #[test]
    fn nkey_signature_verifies_against_the_public_key() {
        let kp = user();
        let seed = kp.seed().unwrap();
        let mut o = options();
        NatsAuth::Nkey {
            seed: Secret::new(seed),
        }
        .apply(&mut o, Some("Xp2Ql0eU9sY3a1Bc"))
        .unwrap();
        let public = o.nkey.clone().unwrap();
        assert_eq!(public, kp.public_key());
        assert!(public.starts_with('U'));
        let sig = BASE64URL_NOPAD.decode(o.sig.unwrap().as_bytes()).unwrap();
        let verifier = KeyPair::from_public_key(&public).unwrap();
        verifier.verify(b"Xp2Ql0eU9sY3a1Bc", &sig).unwrap();
        assert!(verifier.verify(b"another nonce", &sig).is_err());
        assert!(o.jwt.is_none() && o.user.is_none());
    }

    #[test]
    fn jwt_sends_jwt_and_signature_without_nkey() {
        let kp = user();
        let auth = NatsAuth::Jwt {
            jwt: Secret::new("eyJhbGciOi.payload.sig"),
            seed: Secret::new(kp.seed().unwrap()),
        };
        let mut o = options();
        auth.apply(&mut o, Some("n0nce")).unwrap();
        assert_eq!(o.jwt.as_deref(), Some("eyJhbGciOi.payload.sig"));
        assert!(o.nkey.is_none());
        let sig = BASE64URL_NOPAD.decode(o.sig.unwrap().as_bytes()).unwrap();
        kp.verify(b"n0nce", &sig).unwrap();
    }

    #[test]
    fn a_malformed_seed_is_refused_without_showing_it() {
        for seed in [
            "",
            "SUAXXXX",
            "not a seed at all",
            "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4",
        ] {
            let auth = NatsAuth::Nkey {
                seed: Secret::new(seed),
            };
            let err = auth.check().unwrap_err();
            assert!(matches!(err, AuthError::BadSeed(_)), "{seed:?}: {err:?}");
            if seed.len() > 4 {
                assert!(!err.to_string().contains(seed), "{err}");
            }
            assert!(auth.apply(&mut options(), Some("n")).is_err());
        }
    }

    fn creds(jwt: &str, seed: &str) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        )
    }

    #[test]
    fn creds_files_as_nsc_writes_them() {
        let kp = user();
        let seed = kp.seed().unwrap();
        let parsed = parse_creds(&creds("eyJ0eXAiOiJKV1QifQ.e30.c2ln", &seed)).unwrap();
        assert_eq!(
            parsed,
            NatsAuth::Jwt {
                jwt: Secret::new("eyJ0eXAiOiJKV1QifQ.e30.c2ln"),
                seed: Secret::new(seed.clone()),
            }
        );
        // CRLF line ends and indentation are tolerated, as nats.go's expression does.
        let crlf = creds("eyJ.a.b", &seed).replace('\n', "\r\n  ");
        assert!(matches!(parse_creds(&crlf), Ok(NatsAuth::Jwt { .. })));
    }

    #[test]
    fn malformed_creds_are_refused_with_the_reason() {
        let seed = user().seed().unwrap();
        let cases = [
            ("".to_owned(), "no JWT block"),
            ("just text\n".to_owned(), "no JWT block"),
            (
                "-----BEGIN NATS USER JWT-----\neyJ.a.b\n------END NATS USER JWT------\n"
                    .to_owned(),
                "no seed block",
            ),
            (
                "-----BEGIN NATS USER JWT-----\neyJ.a.b\n".to_owned(),
                "without its closing line",
            ),
            (
                "-----BEGIN NATS USER JWT-----\n------END NATS USER JWT------\n".to_owned(),
                "an empty block",
            ),
            (creds("eyJ.a.b", "SUnotaseed"), "not a valid nkey seed"),
        ];
        for (text, want) in cases {
            let err = parse_creds(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        // The seed is checked, and never echoed.
        let err = parse_creds(&creds("eyJ.a.b", &seed[..20])).unwrap_err();
        assert!(!err.to_string().contains(&seed[..20]), "{err}");
    }

    /// Debug of every variant shows the method and masks every secret.
    #[test]
    fn debug_masks_every_secret() {
        let all = [
            NatsAuth::UserPassword {
                user: "alice".into(),
                password: Secret::new("pa55word"),
            },
            NatsAuth::Token(Secret::new("t0ken")),
            NatsAuth::Nkey {
                seed: Secret::new("SUAMSEEDSEED"),
            },
            NatsAuth::Jwt {
                jwt: Secret::new("eyJjwtjwt"),
                seed: Secret::new("SUAMSEEDSEED"),
            },
        ];
        for a in all {
            let text = format!("{a:?} {}", a.method());
            for secret in ["pa55word", "t0ken", "SUAMSEEDSEED", "eyJjwtjwt"] {
                assert!(!text.contains(secret), "{text}");
            }
            assert!(text.contains("***"), "{text}");
        }
    }
}
