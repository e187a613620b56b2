//! `Stream`: batches in, cumulative acknowledgements out, under a window.
//!
//! The first response, sent before any batch is read, gives the window: the client may
//! send batches up to `acknowledged + window`. The collector reads a batch only while fewer
//! than `window` are unacknowledged, so a client that sends more is held back by HTTP/2
//! flow control rather than buffered. Batches complete in order (one acknowledgement
//! covers every batch up to it), each at its own ack level. A batch that cannot be taken
//! in — invalid, or the log full — ends the stream with that status, after a last
//! acknowledgement for everything before it, so the client knows where to resume.

use crate::intake::{Intake, log_level};
use futures::FutureExt;
use futures::stream::{FuturesOrdered, StreamExt};
use runnel_proto::v1::{StreamRequest, StreamResponse};
use runnel_server::Shutdown;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

type Completion = Pin<Box<dyn Future<Output = Result<u64, Status>> + Send>>;
type Responses = mpsc::Sender<Result<StreamResponse, Status>>;

/// Serves one `Stream` call.
pub(crate) fn serve(
    intake: Arc<Intake>,
    inbound: Streaming<StreamRequest>,
    window: u32,
    shutdown: Shutdown,
) -> Pin<Box<dyn tokio_stream::Stream<Item = Result<StreamResponse, Status>> + Send>> {
    let (responses, receiver) = mpsc::channel(16);
    tokio::spawn(run(intake, inbound, window, shutdown, responses));
    Box::pin(ReceiverStream::new(receiver))
}

async fn run(
    intake: Arc<Intake>,
    mut inbound: Streaming<StreamRequest>,
    window: u32,
    shutdown: Shutdown,
    responses: Responses,
) {
    let ack = |acknowledged| StreamResponse {
        acknowledged,
        window,
    };
    if responses.send(Ok(ack(0))).await.is_err() {
        return;
    }
    let mut pending: FuturesOrdered<Completion> = FuturesOrdered::new();
    let mut next = 1u64;
    let mut acknowledged = 0u64;
    let mut input_done = false;
    loop {
        if input_done && pending.is_empty() {
            return;
        }
        tokio::select! {
            biased;
            Some(done) = pending.next(), if !pending.is_empty() => {
                match done {
                    Ok(sequence) => {
                        acknowledged = sequence;
                        // Everything else already done goes in the same acknowledgement.
                        while let Some(Some(Ok(sequence))) = pending.next().now_or_never() {
                            acknowledged = sequence;
                        }
                        if responses.send(Ok(ack(acknowledged))).await.is_err() {
                            return;
                        }
                    }
                    Err(status) => {
                        let _ = responses.send(Ok(ack(acknowledged))).await;
                        let _ = responses.send(Err(status)).await;
                        return;
                    }
                }
            }
            message = inbound.message(), if !input_done && pending.len() < window as usize => {
                let batch = match message {
                    Ok(Some(batch)) => batch,
                    Ok(None) => {
                        input_done = true;
                        continue;
                    }
                    // The client went away or broke the stream: nobody to answer.
                    Err(_) => return,
                };
                let sequence = batch.sequence;
                let taken = if sequence != next {
                    Err(Status::invalid_argument(format!(
                        "batch sequence {sequence}: expected {next} (batches are numbered from 1, one more each)"
                    )))
                } else {
                    match log_level(batch.ack_level) {
                        Ok(level) => intake
                            .submit(None, batch.events, level, "stream")
                            .await
                            .map_err(Status::from),
                        Err(error) => Err(Status::from(error)),
                    }
                };
                match taken {
                    Ok(accepted) => {
                        next += 1;
                        pending.push_back(Box::pin(async move {
                            accepted.done().await.map(|()| sequence).map_err(Status::from)
                        }));
                    }
                    Err(status) => {
                        let status = Status::new(
                            status.code(),
                            format!("batch {sequence}: {}", status.message()),
                        );
                        // Acknowledge what came before, then say why this batch was not taken.
                        while let Some(done) = pending.next().await {
                            match done {
                                Ok(sequence) => acknowledged = sequence,
                                Err(_) => break,
                            }
                        }
                        let _ = responses.send(Ok(ack(acknowledged))).await;
                        let _ = responses.send(Err(status)).await;
                        return;
                    }
                }
            }
            () = shutdown.wait() => {
                let _ = responses.send(Ok(ack(acknowledged))).await;
                let _ = responses
                    .send(Err(Status::unavailable("the collector is stopping; resume after the last acknowledged batch")))
                    .await;
                return;
            }
        }
    }
}
