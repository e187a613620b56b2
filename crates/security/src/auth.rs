//! Authentication: who is calling, from the `authorization: Bearer …` header (gRPC
//! metadata or HTTP) or the client certificate the TLS handshake verified.
//!
//! - **Static tokens** are configured as their SHA-256 only. Tokens are meant to be long
//!   random strings (`runnel auth token` makes 256-bit ones), for which a fast hash is the
//!   right one: nothing is guessable, and a leaked configuration gives nothing away.
//! - **JWT** (HS256 with a shared secret, RS256 with a PEM public key or a JWKS file): the
//!   signature with exactly the configured algorithm, `exp` (required), `nbf`, `iss` and
//!   `aud`; the configured claim (`sub` by default) names the caller. Key files are
//!   reloaded when they change, for key rotation.
//! - **Client certificates** (with `auth.mtls`): the verified certificate's common name.
//!
//! The principal says which of the three named the caller — `token:<name>`,
//! `jwt:<subject>`, `cert:<common name>` — so that they cannot collide.
//!
//! A presented token is decisive: a bad token is refused even on a connection with a good
//! client certificate. Refusals say only "missing", "invalid" or "expired" — never which
//! check failed or what was expected — and are counted by reason.

use crate::SecurityError;
use crate::config::{AuthConfig, JwtAlgorithm, JwtConfig};
use crate::incoming::PeerInfo;
use crate::policy::{Caller, Policy, PrincipalKind};
use crate::reload::Reloading;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::collections::HashMap;
use std::sync::Arc;

/// Why a caller was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials came with the call.
    #[error("missing credentials: send `authorization: Bearer <token>`")]
    Missing,
    /// The credentials are not valid here.
    #[error("invalid credentials")]
    Invalid,
    /// The token was valid once and has expired.
    #[error("credentials expired")]
    Expired,
}

impl AuthError {
    /// The metric label.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Invalid => "invalid",
            AuthError::Expired => "expired",
        }
    }
}

impl From<AuthError> for tonic::Status {
    fn from(error: AuthError) -> tonic::Status {
        tonic::Status::unauthenticated(error.to_string())
    }
}

/// The hex SHA-256 of a token, as `auth.tokens[].sha256` holds it.
pub fn token_sha256(token: &str) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ))
}

/// A new random token: 32 bytes from the system's CSPRNG, hex.
pub fn generate_token() -> Result<String, SecurityError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| SecurityError::Invalid("the system random generator failed".into()))?;
    Ok(format!("rnl_{}", hex::encode(bytes)))
}

/// The keys a JWT may be signed with.
enum JwtKeys {
    One(DecodingKey),
    /// From a JWKS: `kid` → key.
    Set(Vec<(Option<String>, DecodingKey)>),
}

struct Jwt {
    keys: Arc<Reloading<JwtKeys>>,
    validation: Validation,
    principal_claim: String,
}

fn jwt_keys(config: &JwtConfig, file: &[u8]) -> Result<JwtKeys, SecurityError> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        SecurityError::Invalid(format!("auth.jwt.{what}: {e}"))
    };
    Ok(match config.algorithm {
        JwtAlgorithm::HS256 => {
            let secret = file.strip_suffix(b"\n").unwrap_or(file);
            if secret.len() < 32 {
                return Err(SecurityError::Invalid(
                    "auth.jwt.secret_file: an HS256 secret needs at least 32 bytes".into(),
                ));
            }
            JwtKeys::One(DecodingKey::from_secret(secret))
        }
        JwtAlgorithm::RS256 if config.public_key_file.is_some() => {
            JwtKeys::One(DecodingKey::from_rsa_pem(file).map_err(|e| bad("public_key_file", &e))?)
        }
        JwtAlgorithm::RS256 => {
            let set: jsonwebtoken::jwk::JwkSet =
                serde_json::from_slice(file).map_err(|e| bad("jwks_file", &e))?;
            let keys = set
                .keys
                .iter()
                .filter(|jwk| {
                    matches!(
                        jwk.algorithm,
                        jsonwebtoken::jwk::AlgorithmParameters::RSA(_)
                    )
                })
                .map(|jwk| {
                    DecodingKey::from_jwk(jwk)
                        .map(|key| (jwk.common.key_id.clone(), key))
                        .map_err(|e| bad("jwks_file", &e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if keys.is_empty() {
                return Err(bad("jwks_file", &"no RSA key in the set"));
            }
            JwtKeys::Set(keys)
        }
    })
}

impl Jwt {
    fn load(config: &JwtConfig) -> Result<Jwt, SecurityError> {
        let path = config
            .secret_file
            .clone()
            .or_else(|| config.public_key_file.clone())
            .or_else(|| config.jwks_file.clone())
            .ok_or_else(|| SecurityError::Invalid("auth.jwt: no key file".into()))?;
        let keys = {
            let config = config.clone();
            Reloading::watch(
                "jwt",
                vec![path],
                config.reload_interval,
                Box::new(move |files| jwt_keys(&config, &files[0])),
            )?
        };
        let mut validation = Validation::new(match config.algorithm {
            JwtAlgorithm::HS256 => Algorithm::HS256,
            JwtAlgorithm::RS256 => Algorithm::RS256,
        });
        validation.set_issuer(&[config.issuer.as_str()]);
        validation.set_audience(&[config.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = config.leeway.as_secs();
        Ok(Jwt {
            keys,
            validation,
            principal_claim: config.principal_claim.clone(),
        })
    }

    fn verify(&self, token: &str) -> Result<String, AuthError> {
        let keys = self.keys.current();
        let key = match keys.as_ref() {
            JwtKeys::One(key) => key,
            JwtKeys::Set(set) => {
                let kid = jsonwebtoken::decode_header(token)
                    .map_err(|_| AuthError::Invalid)?
                    .kid;
                match (kid, set.as_slice()) {
                    (None, [(_, only)]) => only,
                    (Some(kid), set) => set
                        .iter()
                        .find(|(id, _)| id.as_deref() == Some(kid.as_str()))
                        .map(|(_, key)| key)
                        .ok_or(AuthError::Invalid)?,
                    (None, _) => return Err(AuthError::Invalid),
                }
            }
        };
        let claims = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            key,
            &self.validation,
        )
        .map_err(|error| {
            tracing::debug!(%error, "jwt refused");
            match error.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid,
            }
        })?
        .claims;
        match claims.get(&self.principal_claim) {
            Some(serde_json::Value::String(name)) if !name.is_empty() && name.len() <= 256 => {
                Ok(name.clone())
            }
            _ => {
                tracing::debug!(claim = %self.principal_claim, "jwt without a usable principal claim");
                Err(AuthError::Invalid)
            }
        }
    }
}

/// Decides who is calling.
pub struct Authenticator {
    policy: Arc<Policy>,
    enabled: bool,
    mtls: bool,
    /// SHA-256 of a token → its principal.
    tokens: HashMap<Vec<u8>, Arc<str>>,
    jwt: Option<Jwt>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("enabled", &self.enabled)
            .field("mtls", &self.mtls)
            .field("tokens", &self.tokens.len())
            .field("jwt", &self.jwt.is_some())
            .finish()
    }
}

impl Authenticator {
    /// From the configuration, loading JWT keys (and watching them).
    pub fn new(config: &AuthConfig) -> Result<Authenticator, SecurityError> {
        if !config.enabled {
            return Ok(Authenticator::open());
        }
        let tokens = config
            .tokens
            .iter()
            .map(|t| {
                let hash = hex::decode(&t.sha256).map_err(|_| {
                    SecurityError::Invalid("auth.tokens[].sha256 is not hex".into())
                })?;
                let name = t.principal.strip_prefix("token:").unwrap_or(&t.principal);
                Ok((hash, PrincipalKind::Token.principal(name)))
            })
            .collect::<Result<_, SecurityError>>()?;
        Ok(Authenticator {
            policy: Arc::new(Policy::from_grants(&config.grants)),
            enabled: true,
            mtls: config.mtls,
            tokens,
            jwt: config.jwt.as_ref().map(Jwt::load).transpose()?,
        })
    }

    /// Authentication off: everyone is an anonymous caller with an open policy.
    pub fn open() -> Authenticator {
        Authenticator {
            policy: Arc::new(Policy::open()),
            enabled: false,
            mtls: false,
            tokens: HashMap::new(),
            jwt: None,
        }
    }

    /// Whether calls must be authenticated.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The caller of a request with these headers, on this connection.
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        peer: Option<&PeerInfo>,
    ) -> Result<Caller, AuthError> {
        if !self.enabled {
            return Ok(Caller::new(None, Arc::clone(&self.policy)));
        }
        let principal = match headers.get(http::header::AUTHORIZATION) {
            Some(value) => self.verify_header(value)?,
            None => match peer.and_then(|p| p.certificate_name.clone()) {
                Some(name) if self.mtls => PrincipalKind::Cert.principal(&name),
                _ => return Err(AuthError::Missing),
            },
        };
        Ok(Caller::new(Some(principal), Arc::clone(&self.policy)))
    }

    fn verify_header(&self, value: &http::HeaderValue) -> Result<Arc<str>, AuthError> {
        let text = value.to_str().map_err(|_| AuthError::Invalid)?;
        let (scheme, token) = text.split_once(' ').ok_or(AuthError::Invalid)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Invalid);
        }
        let token = token.trim();
        if token.is_empty() || token.len() > 16 * 1024 {
            return Err(AuthError::Invalid);
        }
        // A JWT is three base64url parts; a static token has no dots.
        if let Some(jwt) = &self.jwt
            && token.bytes().filter(|&b| b == b'.').count() == 2
        {
            return jwt
                .verify(token)
                .map(|name| PrincipalKind::Jwt.principal(&name));
        }
        let hash = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        self.tokens
            .get(hash.as_ref())
            .cloned()
            .ok_or(AuthError::Invalid)
    }
}
