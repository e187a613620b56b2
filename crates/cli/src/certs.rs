//! `runnel certs` and `runnel auth`: development certificates and tokens, so the secure
//! setup is one command away.
//!
//! `runnel certs init` makes a CA, a certificate for each of the five services (valid for
//! the service's name, `localhost`, `127.0.0.1` and `::1`, for both ends of a link) and one
//! for a client, and writes `secure.toml`: TLS and mutual TLS on every listener, every
//! service calling the others with its own certificate, authentication by certificate,
//! and grants that let each service do its part of the pipeline and the `client`
//! certificate use it. `runnel up --config certs/secure.toml` then runs the pipeline that
//! way.

use anyhow::{Context, Result, bail};
use runnel_security::certs::{DevCa, default_names, write_file, write_pair};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The services that get a certificate, and the principal each one authenticates as.
const SERVICES: [&str; 5] = ["collector", "broker", "analyzer", "store", "gateway"];
/// The client certificate's name (and principal).
const CLIENT: &str = "client";

/// `runnel certs …`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum CertsCommand {
    /// Make a development CA, certificates for the five services and a client, and a
    /// `secure.toml` that turns on TLS, mutual TLS and authentication everywhere.
    Init {
        /// Where to write them.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// How long the certificates are valid, in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace files that exist.
        #[arg(long)]
        force: bool,
    },
    /// Sign one more certificate with the CA in `--dir` (`ca.pem`, `ca.key`).
    Issue {
        /// Its common name: the principal mutual TLS authenticates it as.
        name: String,
        /// DNS names and IP addresses it is valid for (default: the name and loopback).
        #[arg(long = "san")]
        names: Vec<String>,
        /// Where the CA is, and where to write `<name>.pem` and `<name>.key`.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// How long the certificate is valid, in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace files that exist.
        #[arg(long)]
        force: bool,
    },
}

/// `runnel auth …`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum AuthCommand {
    /// Make a random bearer token and print it with the configuration entry (its
    /// SHA-256) that accepts it.
    Token {
        /// The principal the token authenticates as.
        #[arg(long)]
        principal: String,
    },
}

pub(crate) fn certs(command: CertsCommand) -> Result<ExitCode> {
    match command {
        CertsCommand::Init { dir, days, force } => init(&dir, days, force),
        CertsCommand::Issue {
            name,
            names,
            dir,
            days,
            force,
        } => {
            let ca = load_ca(&dir)?;
            let names = if names.is_empty() {
                default_names(&name)
            } else {
                names
            };
            let issued = ca.issue(&name, &names, days)?;
            let (cert, key) = write_pair(&dir, &name, &issued, force)?;
            eprintln!(
                "wrote {} and {} (valid {days} days for {})",
                cert.display(),
                key.display(),
                names.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub(crate) fn auth(command: AuthCommand) -> Result<ExitCode> {
    match command {
        AuthCommand::Token { principal } => {
            if principal.is_empty() || principal.contains('"') {
                bail!("--principal must be a non-empty name without quotes");
            }
            let token = runnel_security::auth::generate_token()?;
            let hash = runnel_security::auth::token_sha256(&token);
            println!("{token}");
            eprintln!(
                "give the token (above) to {principal:?}; add this to each service that should accept it:\n\n\
                 [[<service>.server.auth.tokens]]\nprincipal = \"{principal}\"\nsha256 = \"{hash}\"\n"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load_ca(dir: &Path) -> Result<DevCa> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (run `runnel certs init` first)", path.display()))
    };
    Ok(DevCa::load(&read("ca.pem")?, &read("ca.key")?)?)
}

fn init(dir: &Path, days: u32, force: bool) -> Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let (ca, ca_key) = DevCa::generate("Runnel development CA", days)?;
    write_file(&dir.join("ca.pem"), &ca.cert_pem, false, force)?;
    write_file(&dir.join("ca.key"), &ca_key, true, force)?;
    for name in SERVICES.into_iter().chain([CLIENT]) {
        let issued = ca.issue(name, &default_names(name), days)?;
        write_pair(&dir, name, &issued, force)?;
    }
    let config = dir.join("secure.toml");
    write_file(&config, &secure_toml(&dir), false, force)?;
    eprintln!(
        "wrote a CA, certificates for {} and {CLIENT}, and {} to {} (valid {days} days)\n\n\
         run the pipeline with TLS, mutual TLS and certificate authentication:\n  \
         runnel up --config {}\n\
         and call it as the client:\n  \
         runnel send --collector https://127.0.0.1:7101 --ca {d}/ca.pem --cert {d}/client.pem --cert-key {d}/client.key\n  \
         curl --cacert {d}/ca.pem --cert {d}/client.pem --key {d}/client.key https://127.0.0.1:8080/v1/results/avg_value_per_key/sensor-1",
        SERVICES.join(", "),
        config.display(),
        dir.display(),
        config.display(),
        d = dir.display(),
    );
    Ok(ExitCode::SUCCESS)
}

/// What each service's callers may do there: `(principal, allow, topics, queries)`.
fn grants(service: &str) -> Vec<(&'static str, &'static str, &'static str, &'static str)> {
    const ALL: &str = "[\"*\"]";
    const NONE: &str = "[]";
    match service {
        // Tap reads the topics it serves.
        "collector" => vec![(CLIENT, "[\"produce\", \"consume\"]", ALL, NONE)],
        "broker" => vec![
            // Topics created on demand (Publish), and read for Tap.
            (
                "collector",
                "[\"produce\", \"consume\", \"manage\"]",
                ALL,
                NONE,
            ),
            // Re-keyed stages, output and side-output topics are the analyzer's own.
            (
                "analyzer",
                "[\"produce\", \"consume\", \"manage\"]",
                ALL,
                NONE,
            ),
            (CLIENT, "[\"produce\", \"consume\", \"manage\"]", ALL, NONE),
        ],
        "analyzer" => vec![(CLIENT, "[\"read_results\", \"manage\"]", NONE, ALL)],
        "store" => vec![
            ("analyzer", "[\"write_results\"]", NONE, ALL),
            ("gateway", "[\"read_results\"]", NONE, ALL),
            // Track answers with the token's purchase-propensity score.
            (
                "collector",
                "[\"read_results\"]",
                NONE,
                "[\"purchase_propensity\"]",
            ),
            (CLIENT, "[\"read_results\"]", NONE, ALL),
        ],
        // Webhooks take `manage`.
        "gateway" => vec![(CLIENT, "[\"read_results\", \"manage\"]", NONE, ALL)],
        _ => Vec::new(),
    }
}

/// A configuration with TLS, mutual TLS and certificate authentication on all five
/// services, the certificates in `dir`.
fn secure_toml(dir: &Path) -> String {
    let path = |name: &str| format!("{:?}", dir.join(name).display().to_string());
    let mut out = String::from(
        "# Written by `runnel certs init`: TLS and mutual TLS on every listener, every service\n\
         # calling the others with its own certificate, callers authenticated by their\n\
         # certificate's common name, and what each may do. See docs/security.md.\n",
    );
    for service in SERVICES {
        out.push_str(&format!(
            "\n[{service}.server.tls]\ncert = {}\nkey = {}\nclient_ca = {}\n\
             \n[{service}.server.connect]\nca = {}\ncert = {}\nkey = {}\n\
             \n[{service}.server.auth]\nenabled = true\nmtls = true\n",
            path(&format!("{service}.pem")),
            path(&format!("{service}.key")),
            path("ca.pem"),
            path("ca.pem"),
            path(&format!("{service}.pem")),
            path(&format!("{service}.key")),
        ));
        for (principal, allow, topics, queries) in grants(service) {
            out.push_str(&format!(
                "\n[[{service}.server.auth.grants]]\nprincipal = \"{principal}\"\nallow = {allow}\ntopics = {topics}\nqueries = {queries}\n"
            ));
        }
    }
    out
}
