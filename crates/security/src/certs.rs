//! Development certificates: a CA of one's own and certificates it signs for each service
//! and client, so that TLS and mutual TLS are one command away (`runnel certs init`).
//!
//! Keys are ECDSA P-256. Every service certificate is good for both ends of a link —
//! server authentication on its listeners and client authentication when it calls the
//! others — and its common name is the service's name, which is the principal mutual TLS
//! authenticates it as. These are for development and tests: production certificates come
//! from the operator's own PKI (cert-manager, Vault, …), which Runnel reads the same way.

use crate::config::GrantConfig;
use crate::{Action, PrincipalKind, SecurityError};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};

fn rcgen_error(what: &str) -> impl FnOnce(rcgen::Error) -> SecurityError + '_ {
    move |e| SecurityError::Invalid(format!("{what}: {e}"))
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

/// A certificate authority that signs development certificates.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM: what services and clients trust.
    pub cert_pem: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // A little in the past, so that a peer whose clock is slightly behind accepts it.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

impl DevCa {
    /// A new CA named `name`, valid for `days`; returns it and its key, PEM.
    pub fn generate(name: &str, days: u32) -> Result<(DevCa, String), SecurityError> {
        let key = KeyPair::generate().map_err(rcgen_error("ca key"))?;
        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, name);
        subject.push(DnType::OrganizationName, "Runnel development");
        params.distinguished_name = subject;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, days);
        let cert = params.self_signed(&key).map_err(rcgen_error("ca"))?;
        let key_pem = key.serialize_pem();
        Ok((
            DevCa {
                issuer: Issuer::new(params, key),
                cert_pem: cert.pem(),
            },
            key_pem,
        ))
    }

    /// The CA in `cert_pem` with its key `key_pem`, to sign more certificates.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<DevCa, SecurityError> {
        let key = KeyPair::from_pem(key_pem).map_err(rcgen_error("ca key"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(rcgen_error("ca"))?;
        Ok(DevCa {
            issuer,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// A certificate for `common_name` (its mutual-TLS principal) that is valid for the
    /// DNS names and IP addresses in `names`, for server and client authentication.
    pub fn issue(
        &self,
        common_name: &str,
        names: &[String],
        days: u32,
    ) -> Result<Issued, SecurityError> {
        let key = KeyPair::generate().map_err(rcgen_error("key"))?;
        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, common_name);
        params.distinguished_name = subject;
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => name
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(rcgen_error("name")),
            })
            .collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, days);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_error(common_name))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The names every development certificate is valid for: its own name (a service's host
/// name in compose), `runnel-<name>` (its Service in Kubernetes), and loopback (where
/// `healthcheck` and a laptop's clients reach it).
pub fn default_names(name: &str) -> Vec<String> {
    vec![
        name.to_owned(),
        format!("runnel-{name}"),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ]
}

/// The pipeline's five services, each a principal (its certificate's common name).
pub const SERVICES: [&str; 5] = ["collector", "broker", "analyzer", "store", "gateway"];

/// The development client's name: the principal its certificate authenticates as.
pub const CLIENT: &str = "client";

/// The grants `service` needs for the pipeline to run with authentication on: each
/// service may do its own part there, and [`CLIENT`] may use every public API. The one
/// list `runnel certs init` writes and the secure deployment files carry.
pub fn pipeline_grants(service: &str) -> Vec<GrantConfig> {
    use Action::{Consume, Manage, Produce, ReadResults, WriteResults};
    let grant = |name: &str, allow: &[Action], topics: &[&str], queries: &[&str]| GrantConfig {
        principal: PrincipalKind::Cert.principal(name).to_string(),
        allow: allow.to_vec(),
        topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        queries: queries.iter().map(|q| (*q).to_owned()).collect(),
        groups: Vec::new(),
    };
    let with_groups = |mut grant: GrantConfig, groups: &[&str]| {
        grant.groups = groups.iter().map(|g| (*g).to_owned()).collect();
        grant
    };
    let all: &[&str] = &["*"];
    match service {
        // Tap reads the topics it serves.
        "collector" => vec![grant(CLIENT, &[Produce, Consume], all, &[])],
        // `*` covers neither the reserved `_…` topics nor the reserved `runnel-…` groups:
        // each service is granted its own by name, and nobody else reaches them.
        "broker" => vec![
            // Topics created on demand (Publish), and read for Tap.
            grant("collector", &[Produce, Consume, Manage], all, &[]),
            // Source topics, output and side-output topics; its re-keyed stages and
            // checkpoints (`_analyzer.…`) and its consumer groups are its own.
            with_groups(
                grant(
                    "analyzer",
                    &[Produce, Consume, Manage],
                    &["*", "_analyzer.*"],
                    &[],
                ),
                &["runnel-analyzer.*"],
            ),
            // The results log every store replica writes and materialises, fenced by the
            // analyzer's groups (their members' results come through the store).
            with_groups(
                grant("store", &[Produce, Consume, Manage], &["_store.*"], &[]),
                &["runnel-analyzer.*"],
            ),
            // Webhook registrations and the delivery group's cursors.
            with_groups(
                grant("gateway", &[Produce, Consume, Manage], &["_gateway.*"], &[]),
                &["runnel-gateway.*"],
            ),
            with_groups(grant(CLIENT, &[Produce, Consume, Manage], all, &[]), all),
        ],
        "analyzer" => vec![
            // The gateway asks which queries exist (ListQueries) to tell an unknown query
            // from one with no results yet, and creates and drops queries for callers that
            // hold `manage` on them at the gateway (POST/DELETE /v1/queries).
            grant("gateway", &[ReadResults, Manage], &[], all),
            grant(CLIENT, &[ReadResults, Manage], &[], all),
        ],
        "store" => vec![
            grant("analyzer", &[WriteResults], &[], all),
            grant("gateway", &[ReadResults], &[], all),
            // Track answers with the token's purchase-propensity score.
            grant("collector", &[ReadResults], &[], &["purchase_propensity"]),
            grant(CLIENT, &[ReadResults], &[], all),
        ],
        // Webhooks take `manage`.
        "gateway" => vec![grant(CLIENT, &[ReadResults, Manage], &[], all)],
        _ => Vec::new(),
    }
}

/// Writes `<dir>/<name>.pem` and `<dir>/<name>.key` (the key readable by its owner only),
/// refusing to overwrite either unless `overwrite`. Returns the two paths.
pub fn write_pair(
    dir: &Path,
    name: &str,
    issued: &Issued,
    overwrite: bool,
) -> Result<(PathBuf, PathBuf), SecurityError> {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    write_file(&cert, &issued.cert_pem, false, overwrite)?;
    write_file(&key, &issued.key_pem, true, overwrite)?;
    Ok((cert, key))
}

/// Writes one PEM file.
pub fn write_file(
    path: &Path,
    contents: &str,
    secret: bool,
    overwrite: bool,
) -> Result<(), SecurityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    if secret {
        options.mode(0o600);
    }
    let io = |source| SecurityError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = options.open(path).map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{common_name, parse_certs};

    #[test]
    fn issued_certificates_chain_to_the_ca_and_carry_their_name() {
        let (ca, ca_key) = DevCa::generate("test ca", 30).unwrap();
        let issued = ca.issue("broker", &default_names("broker"), 30).unwrap();
        let leaf = parse_certs("leaf", issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(common_name(&leaf[0]).as_deref(), Some("broker"));

        // Verified the way a TLS peer verifies it.
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(parse_certs("ca", ca.cert_pem.as_bytes()).unwrap().remove(0))
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            crate::tls::provider(),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        let now = rustls_pki_types::UnixTime::now();
        for name in ["broker", "localhost", "127.0.0.1"] {
            let server = rustls_pki_types::ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(&leaf[0], &[], &server, &[], now)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let other = rustls_pki_types::ServerName::try_from("store").unwrap();
        assert!(
            verifier
                .verify_server_cert(&leaf[0], &[], &other, &[], now)
                .is_err()
        );

        // A reloaded CA signs certificates the same roots accept.
        let again = DevCa::load(&ca.cert_pem, &ca_key).unwrap();
        let second = again.issue("store", &default_names("store"), 30).unwrap();
        let second = parse_certs("second", second.cert_pem.as_bytes()).unwrap();
        let server = rustls_pki_types::ServerName::try_from("store").unwrap();
        verifier
            .verify_server_cert(&second[0], &[], &server, &[], now)
            .unwrap();
    }

    #[test]
    fn keys_are_private_and_files_are_not_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = DevCa::generate("test ca", 1).unwrap();
        let issued = ca.issue("client", &[], 1).unwrap();
        let (_, key) = write_pair(dir.path(), "client", &issued, false).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        assert!(write_pair(dir.path(), "client", &issued, false).is_err());
        write_pair(dir.path(), "client", &issued, true).unwrap();
    }
}
