//! `ProduceStream`: `Produce` pipelined on one HTTP/2 stream, with cumulative acks.
//!
//! One task per stream takes the requests already waiting (at least one, at most
//! [`MAX_RUN_REQUESTS`] and about one message's worth of bytes), checks and authorizes each
//! as the unary `Produce` does, stores them together ([`BrokerService::store`]: one append
//! for adjacent plain batches of a partition, one durable wait per partition) and answers
//! them with one cumulative ack. It reads nothing more until that answer is queued, and the
//! answer queue is [`ANSWER_BUFFER`] deep: a client that sends faster than the broker
//! stores, or does not read its answers, is held back by HTTP/2 flow control, and the
//! broker's memory per stream stays bounded. The contract is in `broker.proto`.

use crate::error::BrokerError;
use crate::service::{BrokerService, PlannedProduce, authorize_produce};
use futures::FutureExt;
use prost::Message;
use runnel_proto::v1::{ProduceStreamAnswer, ProduceStreamRequest, ProduceStreamResponse};
use runnel_security::Caller;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

/// The most requests stored together.
pub(crate) const MAX_RUN_REQUESTS: usize = 512;
/// Answers queued for a client before the broker stops reading its stream.
pub(crate) const ANSWER_BUFFER: usize = 8;

/// Where a stream's answers go: cumulative acks, then at most one error that ends it.
pub(crate) type Answers = mpsc::Sender<Result<ProduceStreamResponse, Status>>;

/// Serves one `ProduceStream` until the client closes it, a request fails, the client
/// goes away or the broker stops.
pub(crate) async fn serve(
    service: BrokerService,
    caller: Caller,
    mut requests: Streaming<ProduceStreamRequest>,
    answers: Answers,
    max_run_bytes: usize,
) {
    let mut last_sequence: Option<u64> = None;
    let shutdown = service.shutdown().clone();
    loop {
        let first = tokio::select! {
            biased;
            () = answers.closed() => return,
            () = shutdown.wait() => {
                let _ = answers
                    .send(Err(Status::unavailable(
                        "the broker is shutting down: send what was not acknowledged again elsewhere",
                    )))
                    .await;
                return;
            }
            message = requests.message() => message,
        };
        let mut run = match first {
            Ok(Some(request)) => vec![request],
            // The client closed its side: everything it sent is answered.
            Ok(None) => return,
            // A message that could not be read (too large, say), or the client went away.
            Err(status) => {
                let _ = answers.send(Err(status)).await;
                return;
            }
        };
        // Take whatever else is already waiting, up to the bounds.
        let mut bytes = run[0].encoded_len();
        // How the client's side ended, if it did while this run was taken.
        let mut ended: Option<Option<Status>> = None;
        while run.len() < MAX_RUN_REQUESTS && bytes < max_run_bytes {
            match requests.message().now_or_never() {
                Some(Ok(Some(request))) => {
                    bytes += request.encoded_len();
                    run.push(request);
                }
                Some(Ok(None)) => {
                    ended = Some(None);
                    break;
                }
                Some(Err(status)) => {
                    ended = Some(Some(status));
                    break;
                }
                None => break,
            }
        }
        let outcome = store_run(&service, &caller, &mut last_sequence, run).await;
        if !outcome.acknowledged.answers.is_empty()
            && answers.send(Ok(outcome.acknowledged)).await.is_err()
        {
            return;
        }
        if let Some(status) = outcome.failure {
            let _ = answers.send(Err(status)).await;
            return;
        }
        match ended {
            None => {}
            Some(None) => return,
            Some(Some(status)) => {
                let _ = answers.send(Err(status)).await;
                return;
            }
        }
    }
}

/// What became of one run of requests.
struct RunOutcome {
    /// The cumulative ack of the leading requests stored (possibly none).
    acknowledged: ProduceStreamResponse,
    /// The status the stream ends with, naming the failed request's sequence.
    failure: Option<Status>,
}

/// Checks, authorizes and stores `run` in order. A request that fails its checks stops the
/// run there: the requests before it are still stored and answered, none after it is.
async fn store_run(
    service: &BrokerService,
    caller: &Caller,
    last_sequence: &mut Option<u64>,
    run: Vec<ProduceStreamRequest>,
) -> RunOutcome {
    let mut sequences = Vec::with_capacity(run.len());
    let mut planned: Vec<PlannedProduce> = Vec::with_capacity(run.len());
    let mut refused = None;
    for request in run {
        let sequence = request.sequence;
        match prepare(service, caller, *last_sequence, request).await {
            Ok(plan) => {
                *last_sequence = Some(sequence);
                sequences.push(sequence);
                planned.push(plan);
            }
            Err(status) => {
                refused = Some(named(sequence, status));
                break;
            }
        }
    }
    let stored = if planned.is_empty() {
        None
    } else {
        Some(service.store(planned).await)
    };
    let mut acknowledged = ProduceStreamResponse::default();
    let mut failure = refused;
    if let Some(stored) = stored {
        if let Some((index, error)) = stored.failure {
            // A storage failure comes before any refusal: its request was sent first.
            let sequence = sequences.get(index).copied().unwrap_or_default();
            failure = Some(named(sequence, Status::from(error)));
        }
        acknowledged.answers = sequences
            .iter()
            .zip(stored.answers)
            .map(|(&sequence, response)| ProduceStreamAnswer {
                sequence,
                response: Some(response),
            })
            .collect();
        acknowledged.acknowledged = acknowledged.answers.last().map_or(0, |a| a.sequence);
    }
    RunOutcome {
        acknowledged,
        failure,
    }
}

/// One request's checks: its sequence, its caller's permissions, and everything `Produce`
/// checks.
async fn prepare(
    service: &BrokerService,
    caller: &Caller,
    last_sequence: Option<u64>,
    request: ProduceStreamRequest,
) -> Result<PlannedProduce, Status> {
    if let Some(last) = last_sequence
        && request.sequence <= last
    {
        return Err(Status::from(BrokerError::InvalidArgument(format!(
            "sequence {} does not follow {last}: sequences must increase along a stream",
            request.sequence
        ))));
    }
    let request = request.request.ok_or_else(|| {
        Status::from(BrokerError::InvalidArgument(
            "request is missing: each message carries a produce request".into(),
        ))
    })?;
    authorize_produce(caller, &request)?;
    Ok(service.prepare_produce(request).await?)
}

/// `status` with the sequence of the request it is about in front of its message.
fn named(sequence: u64, status: Status) -> Status {
    Status::new(
        status.code(),
        format!("request {sequence}: {}", status.message()),
    )
}
