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
use runnel_security::certs::{
    CLIENT, DevCa, SERVICES, default_names, pipeline_grants, write_file, write_pair,
};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
        /// Where the services will read these files, when not from `--dir`: the
        /// directory they are mounted at in a container (`/certs` for
        /// docker-compose.secure.yml). `secure.toml` names the files there.
        #[arg(long)]
        mount: Option<PathBuf>,
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
        CertsCommand::Init {
            dir,
            days,
            force,
            mount,
        } => init(&dir, days, force, mount.as_deref()),
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
                 [[<service>.server.auth.tokens]]\nprincipal = \"{principal}\"\nsha256 = \"{hash}\"\n\n\
                 and grant it what it may do as \"token:{principal}\", e.g.\n\n\
                 [[<service>.server.auth.grants]]\nprincipal = \"token:{principal}\"\nallow = [\"produce\"]\ntopics = [\"events\"]\n"
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

fn init(dir: &Path, days: u32, force: bool, mount: Option<&Path>) -> Result<ExitCode> {
    if let Some(mount) = mount
        && !mount.is_absolute()
    {
        bail!("--mount must be an absolute path (where a container sees the files)");
    }
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
    write_file(&config, &secure_toml(mount.unwrap_or(&dir))?, false, force)?;
    let run = match mount {
        Some(mount) => format!(
            "give the service keys to the services' user and mount {} at {} (RUNNEL_CERTS):\n  \
             sudo chown 65532 {d}/{{collector,broker,analyzer,store,gateway}}.key\n  \
             docker compose -f docker-compose.yml -f docker-compose.secure.yml up -d",
            dir.display(),
            mount.display(),
            d = dir.display(),
        ),
        None => format!("runnel up --config {}", config.display()),
    };
    eprintln!(
        "wrote a CA, certificates for {} and {CLIENT}, and {} to {} (valid {days} days)\n\n\
         run the pipeline with TLS, mutual TLS and certificate authentication:\n  \
         {run}\n\
         and call it as the client:\n  \
         runnel send --collector https://127.0.0.1:7101 --ca {d}/ca.pem --cert {d}/client.pem --cert-key {d}/client.key\n  \
         curl --cacert {d}/ca.pem --cert {d}/client.pem --key {d}/client.key https://127.0.0.1:8080/v1/results/avg_value_per_key/sensor-1",
        SERVICES.join(", "),
        config.display(),
        dir.display(),
        d = dir.display(),
    );
    Ok(ExitCode::SUCCESS)
}

/// A configuration with TLS, mutual TLS and certificate authentication on all five
/// services, the certificates in `dir`, and the grants the pipeline needs.
fn secure_toml(dir: &Path) -> Result<String> {
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
        for grant in pipeline_grants(service) {
            #[derive(serde::Serialize)]
            struct Grants {
                grants: [runnel_security::GrantConfig; 1],
            }
            let table =
                toml::to_string(&Grants { grants: [grant] }).context("writing a grant as TOML")?;
            let table = table.replacen(
                "[[grants]]",
                &format!("[[{service}.server.auth.grants]]"),
                1,
            );
            out.push('\n');
            out.push_str(&table);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use runnel_server::ServiceConfig;
    use runnel_server::config::load_from;

    /// Loads `service`'s part of `file` with its own configuration type, as it starts.
    fn server_of(service: &str, file: &Path) -> runnel_server::ServerConfig {
        fn load<C: ServiceConfig>(file: &Path) -> runnel_server::ServerConfig {
            load_from::<C>(Some(file), Vec::new())
                .unwrap_or_else(|e| panic!("{}: {e}", C::SECTION))
                .server()
                .clone()
        }
        match service {
            "collector" => load::<runnel_collector::CollectorConfig>(file),
            "broker" => load::<runnel_broker::BrokerConfig>(file),
            "analyzer" => load::<runnel_analyzer::AnalyzerConfig>(file),
            "store" => load::<runnel_store::StoreConfig>(file),
            "gateway" => load::<runnel_gateway::GatewayConfig>(file),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn init_writes_a_configuration_every_service_accepts_with_the_pipelines_grants() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 30, false, None).unwrap();
        let dir = dir.path().canonicalize().unwrap();
        let file = dir.join("secure.toml");
        for service in SERVICES {
            let server = server_of(service, &file);
            let tls = server.tls.as_ref().expect("tls");
            assert_eq!(tls.cert, dir.join(format!("{service}.pem")), "{service}");
            assert_eq!(tls.client_ca.as_deref(), Some(dir.join("ca.pem").as_path()));
            assert!(server.auth.enabled && server.auth.mtls, "{service}");
            assert_eq!(server.auth.grants, pipeline_grants(service), "{service}");
        }
        // A second init does not overwrite the CA or a key without --force.
        assert!(init(&dir, 30, false, None).is_err());
        init(&dir, 30, true, None).unwrap();
    }

    #[test]
    fn a_mount_names_the_files_where_a_container_sees_them() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 30, false, Some(Path::new("/certs"))).unwrap();
        let text = std::fs::read_to_string(dir.path().join("secure.toml")).unwrap();
        assert!(text.contains("cert = \"/certs/broker.pem\""), "{text}");
        assert!(!text.contains(&*dir.path().to_string_lossy()), "{text}");
        // The files are where --dir says, not under the mount.
        assert!(dir.path().join("broker.key").is_file());
        let relative = init(dir.path(), 30, true, Some(Path::new("certs")));
        assert!(relative.unwrap_err().to_string().contains("absolute"));
    }
}
