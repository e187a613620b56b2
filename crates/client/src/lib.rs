//! A client for Runnel's broker: an idempotent [`Producer`] that stores every event
//! exactly once however often it has to retry, and a [`GroupConsumer`] that takes part in
//! a consumer group — following its assignment, heartbeating, committing — and the kept
//! logs that services use as registries ([`open_kept`], [`follow_partition`]).
//!
//! Both speak the broker's gRPC API (`runnel.v1.Broker`) and nothing else; they are what
//! the benchmarks and the tests use, and what an application embedding Runnel would. They
//! take a `BrokerClient<Peer>`, made with [`connect`] (or [`connect_lazy`]): plaintext or
//! TLS, with a client certificate and a bearer token as [`ConnectConfig`] says.

mod consumer;
mod kept;
mod producer;

pub use consumer::{ConsumerOptions, GroupConsumer, GroupEvent, StreamPart, SubscribeMessage};
pub use kept::{follow_partition, open_kept};
pub use producer::{Producer, ProducerOptions};
pub use runnel_security::{ConnectConfig, Peer, connect, connect_lazy, connect_lazy_with_token};

use tonic::Code;

/// What can go wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker refused the call, or could not be reached for longer than the client
    /// retries.
    #[error("{}: {}", .0.code(), .0.message())]
    Broker(tonic::Status),
    /// The topic has a different shape than the client expects.
    #[error("{0}")]
    Topic(String),
}

/// Whether a call that failed with `code` may succeed if made again unchanged: the broker
/// was unreachable, overloaded or restarting. Everything else is an answer.
pub fn retriable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::ResourceExhausted
            | Code::Internal
            | Code::Aborted
    )
}
