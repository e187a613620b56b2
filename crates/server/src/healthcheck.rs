//! `<binary> healthcheck`: ask a running service whether it is serving, from inside its
//! own container.
//!
//! The images are built `FROM scratch` — no shell, no `curl`, no `grpc_health_probe` — so
//! the binary checks itself: it loads the same configuration the service loads (file and
//! `RUNNEL_<SERVICE>__…` environment), calls `grpc.health.v1.Health/Check` on the
//! configured gRPC address, and exits 0 when the answer is SERVING, 1 otherwise. Docker's
//! `HEALTHCHECK` and Compose use it; Kubernetes can use it as an exec probe (its native
//! `grpc` probe asks the same health service).
//!
//! A service bound to the unspecified address (`0.0.0.0`, `[::]`) is checked on loopback of
//! the same family: the check runs next to the service, in its network namespace. A
//! service with TLS on its listeners is checked over TLS, with the service's own `connect`
//! settings (its CA, and its client certificate where the listener asks for one): its
//! certificate must name the probed address (`runnel certs` puts `localhost` and
//! `127.0.0.1` in every one), or `connect.server_name` must say which name to expect.

use runnel_security::ConnectConfig;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Why a health check did not find the service serving.
#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    /// The configured port is 0: the service picked a port at random and only its
    /// `listening` line says which.
    #[error("the configured grpc address {0} has port 0; give the service a fixed port")]
    EphemeralPort(SocketAddr),
    /// Nothing accepted a connection, or its TLS handshake failed.
    #[error("cannot connect to {addr}: {source}")]
    Unreachable {
        /// The address asked.
        addr: SocketAddr,
        /// Why the connection failed.
        source: runnel_security::SecurityError,
    },
    /// The health call failed (an unknown service name is `NOT_FOUND`).
    #[error("health check on {addr} failed: {status}")]
    Failed {
        /// The address asked.
        addr: SocketAddr,
        /// What the server answered.
        status: tonic::Status,
    },
    /// The server answered, with something other than SERVING.
    #[error("{addr} reports {status:?}")]
    NotServing {
        /// The address asked.
        addr: SocketAddr,
        /// What it reported.
        status: ServingStatus,
    },
    /// No answer in time: the port is bound but the server is not serving yet (still
    /// recovering its data, say) or is stuck.
    #[error("no answer from {addr} within {timeout:?}")]
    TimedOut {
        /// The address asked.
        addr: SocketAddr,
        /// How long the check waited.
        timeout: Duration,
    },
}

/// Where to reach a service that listens on `bound`, from the same host.
pub fn probe_addr(bound: SocketAddr) -> SocketAddr {
    let ip = match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, bound.port())
}

/// Checks the service listening on `bound`: `Ok` if `service` (`""`: the server as a
/// whole) is SERVING, answered within `timeout` (connection included). With `tls`, the
/// check connects over TLS with those settings.
pub async fn check(
    bound: SocketAddr,
    service: &str,
    timeout: Duration,
    tls: Option<&ConnectConfig>,
) -> Result<(), HealthcheckError> {
    if bound.port() == 0 {
        return Err(HealthcheckError::EphemeralPort(bound));
    }
    let addr = probe_addr(bound);
    let ask = async {
        let plaintext = ConnectConfig::default();
        let (scheme, connect) = match tls {
            Some(connect) => ("https", connect),
            None => ("http", &plaintext),
        };
        let channel = runnel_security::connect(&format!("{scheme}://{addr}"), connect, None)
            .await
            .map_err(|source| HealthcheckError::Unreachable { addr, source })?;
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(|status| HealthcheckError::Failed { addr, status })?
            .into_inner()
            .status();
        match status {
            ServingStatus::Serving => Ok(()),
            status => Err(HealthcheckError::NotServing { addr, status }),
        }
    };
    tokio::time::timeout(timeout, ask)
        .await
        .map_err(|_| HealthcheckError::TimedOut { addr, timeout })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_probed_on_loopback_and_others_as_given() {
        let cases = [
            ("0.0.0.0:7102", "127.0.0.1:7102"),
            ("[::]:7102", "[::1]:7102"),
            ("127.0.0.1:7102", "127.0.0.1:7102"),
            ("10.1.2.3:7102", "10.1.2.3:7102"),
        ];
        for (bound, probed) in cases {
            assert_eq!(
                probe_addr(bound.parse().unwrap()),
                probed.parse::<SocketAddr>().unwrap(),
                "{bound}"
            );
        }
    }

    #[tokio::test]
    async fn port_zero_is_refused_before_connecting() {
        let error = check(
            "0.0.0.0:0".parse().unwrap(),
            "",
            Duration::from_secs(1),
            None,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(error, HealthcheckError::EphemeralPort(_)),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        // Bound and dropped: nothing listens there any more.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let error = check(addr, "", Duration::from_secs(5), None)
            .await
            .unwrap_err();
        assert!(
            matches!(error, HealthcheckError::Unreachable { .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_port_that_accepts_but_never_answers_times_out() {
        // A listener nobody accepts on: the kernel completes the handshake, no HTTP/2
        // server ever answers — what a service still recovering its data looks like.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let error = check(addr, "", Duration::from_millis(300), None)
            .await
            .unwrap_err();
        assert!(
            matches!(error, HealthcheckError::TimedOut { .. }),
            "{error}"
        );
        drop(listener);
    }
}
