//! Authentication decisions: static tokens, JWT (HS256, RS256 with a PEM key or a JWKS)
//! and client certificates, accepted and refused. The RSA keys are test fixtures
//! (`fixtures/README.md`).

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use runnel_security::{
    AuthConfig, AuthError, Authenticator, JwtAlgorithm, JwtConfig, PeerInfo, TokenConfig,
};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SECRET: &str = "a shared secret that is long enough for hs256";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(sub: &str) -> serde_json::Value {
    json!({ "sub": sub, "iss": "https://issuer.example", "aud": "runnel", "exp": now() + 600 })
}

fn jwt_config(algorithm: JwtAlgorithm) -> JwtConfig {
    JwtConfig {
        algorithm,
        secret_file: None,
        public_key_file: None,
        jwks_file: None,
        issuer: "https://issuer.example".into(),
        audience: "runnel".into(),
        principal_claim: "sub".into(),
        leeway: Duration::from_secs(5),
        reload_interval: Duration::from_secs(10),
    }
}

fn authenticator(jwt: JwtConfig) -> Authenticator {
    Authenticator::new(&AuthConfig {
        enabled: true,
        jwt: Some(jwt),
        ..AuthConfig::default()
    })
    .unwrap()
}

fn hs256() -> (Authenticator, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let mut config = jwt_config(JwtAlgorithm::HS256);
    config.secret_file = Some(secret);
    (authenticator(config), dir)
}

fn sign_hs(claims: &serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn sign_rs(claims: &serde_json::Value, key: &str, kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    let pem = std::fs::read(fixture(key)).unwrap();
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

fn bearer(token: &str) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    headers
}

fn principal(auth: &Authenticator, token: &str) -> Result<String, AuthError> {
    auth.authenticate(&bearer(token), None)
        .map(|caller| caller.principal().unwrap().to_owned())
}

#[test]
fn hs256_tokens_are_checked_for_signature_expiry_audience_and_issuer() {
    let (auth, _dir) = hs256();
    assert_eq!(
        principal(&auth, &sign_hs(&claims("alice"), SECRET)),
        Ok("jwt:alice".into())
    );

    let mut expired = claims("alice");
    expired["exp"] = json!(now() - 60);
    assert_eq!(
        principal(&auth, &sign_hs(&expired, SECRET)),
        Err(AuthError::Expired)
    );
    // Within the leeway it still passes.
    let mut just = claims("alice");
    just["exp"] = json!(now() - 1);
    assert_eq!(
        principal(&auth, &sign_hs(&just, SECRET)),
        Ok("jwt:alice".into())
    );

    let wrong_key = sign_hs(
        &claims("alice"),
        "another secret of a good length, but wrong",
    );
    assert_eq!(principal(&auth, &wrong_key), Err(AuthError::Invalid));

    let mut other_audience = claims("alice");
    other_audience["aud"] = json!("someone-else");
    assert_eq!(
        principal(&auth, &sign_hs(&other_audience, SECRET)),
        Err(AuthError::Invalid)
    );

    let mut other_issuer = claims("alice");
    other_issuer["iss"] = json!("https://evil.example");
    assert_eq!(
        principal(&auth, &sign_hs(&other_issuer, SECRET)),
        Err(AuthError::Invalid)
    );

    let mut no_expiry = claims("alice");
    no_expiry.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        principal(&auth, &sign_hs(&no_expiry, SECRET)),
        Err(AuthError::Invalid)
    );

    let mut not_yet = claims("alice");
    not_yet["nbf"] = json!(now() + 600);
    assert_eq!(
        principal(&auth, &sign_hs(&not_yet, SECRET)),
        Err(AuthError::Invalid)
    );

    let mut nameless = claims("alice");
    nameless.as_object_mut().unwrap().remove("sub");
    assert_eq!(
        principal(&auth, &sign_hs(&nameless, SECRET)),
        Err(AuthError::Invalid)
    );

    // Only HS256 is accepted: an RS256 token is refused however well it is signed.
    let rs = sign_rs(&claims("alice"), "jwt-signer.key.pem", None);
    assert_eq!(principal(&auth, &rs), Err(AuthError::Invalid));
    // And garbage of the right shape does not get far.
    assert_eq!(principal(&auth, "a.b.c"), Err(AuthError::Invalid));
}

#[test]
fn rs256_tokens_are_checked_against_a_pem_key() {
    let mut config = jwt_config(JwtAlgorithm::RS256);
    config.public_key_file = Some(fixture("jwt-signer.pub.pem"));
    let auth = authenticator(config);
    let good = sign_rs(&claims("svc"), "jwt-signer.key.pem", None);
    assert_eq!(principal(&auth, &good), Ok("jwt:svc".into()));
    let forged = sign_rs(&claims("svc"), "jwt-other.key.pem", None);
    assert_eq!(principal(&auth, &forged), Err(AuthError::Invalid));
    // The classic confusion: an HS256 token keyed with the public key's text.
    let public = std::fs::read_to_string(fixture("jwt-signer.pub.pem")).unwrap();
    assert_eq!(
        principal(&auth, &sign_hs(&claims("svc"), &public)),
        Err(AuthError::Invalid)
    );
    let mut expired = claims("svc");
    expired["exp"] = json!(now() - 600);
    assert_eq!(
        principal(&auth, &sign_rs(&expired, "jwt-signer.key.pem", None)),
        Err(AuthError::Expired)
    );
}

#[test]
fn rs256_tokens_are_checked_against_the_jwks_key_their_kid_names() {
    let mut config = jwt_config(JwtAlgorithm::RS256);
    config.jwks_file = Some(fixture("jwks-signer.json"));
    let auth = authenticator(config);
    let good = sign_rs(&claims("svc"), "jwt-signer.key.pem", Some("signer-2026"));
    assert_eq!(principal(&auth, &good), Ok("jwt:svc".into()));
    // A set of one key also verifies a token without a kid.
    let no_kid = sign_rs(&claims("svc"), "jwt-signer.key.pem", None);
    assert_eq!(principal(&auth, &no_kid), Ok("jwt:svc".into()));
    let unknown_kid = sign_rs(&claims("svc"), "jwt-signer.key.pem", Some("retired"));
    assert_eq!(principal(&auth, &unknown_kid), Err(AuthError::Invalid));
    let forged = sign_rs(&claims("svc"), "jwt-other.key.pem", Some("signer-2026"));
    assert_eq!(principal(&auth, &forged), Err(AuthError::Invalid));
    let mut wrong_audience = claims("svc");
    wrong_audience["aud"] = json!(["other", "another"]);
    assert_eq!(
        principal(
            &auth,
            &sign_rs(&wrong_audience, "jwt-signer.key.pem", Some("signer-2026"))
        ),
        Err(AuthError::Invalid)
    );
}

#[test]
fn static_tokens_match_by_hash_and_certificates_name_callers_when_allowed() {
    let config = AuthConfig {
        enabled: true,
        mtls: true,
        tokens: vec![TokenConfig {
            principal: "sensors".into(),
            sha256: runnel_security::auth::token_sha256("rnl_sensor-token"),
        }],
        ..AuthConfig::default()
    };
    let auth = Authenticator::new(&config).unwrap();
    assert_eq!(
        principal(&auth, "rnl_sensor-token"),
        Ok("token:sensors".into())
    );
    assert_eq!(
        principal(&auth, "rnl_sensor-tokeN"),
        Err(AuthError::Invalid)
    );

    let mut lower = http::HeaderMap::new();
    lower.insert(
        http::header::AUTHORIZATION,
        "bearer rnl_sensor-token".parse().unwrap(),
    );
    assert!(auth.authenticate(&lower, None).is_ok());
    let mut basic = http::HeaderMap::new();
    basic.insert(
        http::header::AUTHORIZATION,
        "Basic cm5sX3NlbnNvci10b2tlbg==".parse().unwrap(),
    );
    assert_eq!(
        auth.authenticate(&basic, None).unwrap_err(),
        AuthError::Invalid
    );

    let mut peer = PeerInfo::unknown(1);
    peer.certificate_name = Some(Arc::from("collector"));
    let by_cert = auth
        .authenticate(&http::HeaderMap::new(), Some(&peer))
        .unwrap();
    assert_eq!(by_cert.principal(), Some("cert:collector"));
    // A presented token decides, even on a connection with a good certificate.
    assert_eq!(
        auth.authenticate(&bearer("rnl_wrong"), Some(&peer))
            .unwrap_err(),
        AuthError::Invalid
    );
    assert_eq!(
        auth.authenticate(&http::HeaderMap::new(), None)
            .unwrap_err(),
        AuthError::Missing
    );

    // Without auth.mtls a certificate names no one.
    let tokens_only = Authenticator::new(&AuthConfig {
        mtls: false,
        ..config
    })
    .unwrap();
    assert_eq!(
        tokens_only
            .authenticate(&http::HeaderMap::new(), Some(&peer))
            .unwrap_err(),
        AuthError::Missing
    );
}

/// A JWT whose subject is spelled like a service's certificate name, and a static token
/// whose principal is, are other callers than the service: they get none of its grants.
#[test]
fn a_jwt_subject_or_token_named_like_a_service_gets_none_of_its_grants() {
    use runnel_security::{Action, GrantConfig, Resource};
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let config = AuthConfig {
        enabled: true,
        mtls: true,
        tokens: vec![TokenConfig {
            principal: "analyzer".into(),
            sha256: runnel_security::auth::token_sha256("rnl_impostor"),
        }],
        jwt: Some(JwtConfig {
            secret_file: Some(secret),
            ..jwt_config(JwtAlgorithm::HS256)
        }),
        grants: vec![GrantConfig {
            principal: "cert:analyzer".into(),
            allow: vec![Action::WriteResults],
            topics: Vec::new(),
            queries: vec!["*".into()],
            groups: Vec::new(),
        }],
    };
    let auth = Authenticator::new(&config).unwrap();
    let write = Resource::Query("avg_value_per_key");

    let mut peer = PeerInfo::unknown(1);
    peer.certificate_name = Some(Arc::from("analyzer"));
    let service = auth
        .authenticate(&http::HeaderMap::new(), Some(&peer))
        .unwrap();
    assert!(service.may(Action::WriteResults, write));

    let jwt = auth
        .authenticate(&bearer(&sign_hs(&claims("analyzer"), SECRET)), None)
        .unwrap();
    assert_eq!(jwt.principal(), Some("jwt:analyzer"));
    assert!(!jwt.may(Action::WriteResults, write));

    let token = auth.authenticate(&bearer("rnl_impostor"), None).unwrap();
    assert_eq!(token.principal(), Some("token:analyzer"));
    assert!(!token.may(Action::WriteResults, write));
}

#[test]
fn with_authentication_off_everyone_is_let_in_anonymously() {
    let auth = Authenticator::new(&AuthConfig::default()).unwrap();
    assert!(!auth.is_enabled());
    let caller = auth.authenticate(&bearer("anything"), None).unwrap();
    assert_eq!(caller.principal(), None);
    assert!(caller.may(
        runnel_security::Action::Manage,
        runnel_security::Resource::AnyTopic
    ));
}

#[test]
fn generated_tokens_are_long_random_and_verify_by_their_hash() {
    let a = runnel_security::auth::generate_token().unwrap();
    let b = runnel_security::auth::generate_token().unwrap();
    assert_ne!(a, b);
    assert_eq!(a.len(), 4 + 64);
    let hash = runnel_security::auth::token_sha256(&a);
    assert_eq!(hash.len(), 64);
    assert!(!hash.contains(&a[4..]));
}

#[test]
fn a_short_hs256_secret_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "short").unwrap();
    let mut config = jwt_config(JwtAlgorithm::HS256);
    config.secret_file = Some(secret);
    let error = Authenticator::new(&AuthConfig {
        enabled: true,
        jwt: Some(config),
        ..AuthConfig::default()
    })
    .unwrap_err();
    assert!(error.to_string().contains("at least 32 bytes"), "{error}");
}
