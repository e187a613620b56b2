//! The unary reads that the gRPC and HTTP APIs share: checks, then calls to the store.

use crate::error::GatewayError;
use runnel_proto::filter::MAX_KEY_BYTES;
use runnel_proto::v1::store_client::StoreClient;
use runnel_proto::v1::{GetRequest, QueryResult, RangeRequest, TopKRequest, TopKResponse};
use runnel_security::{ConnectConfig, Peer};
use std::time::Duration;

/// The store's gRPC client, as every part of the gateway uses it.
pub(crate) type Store = StoreClient<Peer>;

/// Most keys a `TopK` may ask for (as the store accepts).
const MAX_TOP_K: u32 = 1000;

/// Connects (lazily, so the store may start later or restart; tonic reconnects on its
/// own) to the store at `url`, with the gateway's TLS and credentials.
pub(crate) fn connect(
    url: &str,
    connect: &ConnectConfig,
    max_message_bytes: usize,
) -> Result<Store, GatewayError> {
    let channel =
        runnel_security::connect_lazy(url, connect).map_err(|source| GatewayError::StoreUrl {
            url: url.to_owned(),
            source,
        })?;
    Ok(StoreClient::new(channel)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes))
}

/// Reads results from the store on behalf of clients.
#[derive(Debug, Clone)]
pub(crate) struct Results {
    store: Store,
    request_timeout: Duration,
}

pub(crate) fn check_query(query: &str) -> Result<(), GatewayError> {
    runnel_proto::names::validate_query_name(query)
        .map_err(|error| GatewayError::InvalidArgument(error.to_string()))
}

fn check_key(key: &str) -> Result<(), GatewayError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(GatewayError::InvalidArgument(format!(
            "key may have at most {MAX_KEY_BYTES} bytes, got {}",
            key.len()
        )));
    }
    Ok(())
}

impl Results {
    pub(crate) fn new(store: Store, request_timeout: Duration) -> Results {
        Results {
            store,
            request_timeout,
        }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.request_timeout);
        request
    }

    /// The latest result for `query` and `key`, if there is one.
    pub(crate) async fn get(
        &self,
        request: GetRequest,
    ) -> Result<Option<QueryResult>, GatewayError> {
        check_query(&request.query)?;
        check_key(&request.key)?;
        let response = self
            .store
            .clone()
            .get(self.request(request))
            .await
            .map_err(GatewayError::Store)?;
        Ok(response.into_inner().result)
    }

    /// Results for one query and key by window start.
    pub(crate) async fn range(
        &self,
        request: RangeRequest,
    ) -> Result<Vec<QueryResult>, GatewayError> {
        check_query(&request.query)?;
        check_key(&request.key)?;
        let response = self
            .store
            .clone()
            .range(self.request(request))
            .await
            .map_err(GatewayError::Store)?;
        Ok(response.into_inner().results)
    }

    /// The top keys of a query in its most recent window.
    pub(crate) async fn top_k(&self, request: TopKRequest) -> Result<TopKResponse, GatewayError> {
        check_query(&request.query)?;
        if request.k > MAX_TOP_K {
            return Err(GatewayError::InvalidArgument(format!(
                "k may be at most {MAX_TOP_K}, got {}",
                request.k
            )));
        }
        let response = self
            .store
            .clone()
            .top_k(self.request(request))
            .await
            .map_err(GatewayError::Store)?;
        Ok(response.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_name_the_field() {
        assert!(check_query("q").is_ok());
        let error = check_query("").unwrap_err().to_string();
        assert!(error.starts_with("query name \"\" is invalid"), "{error}");
        let error = check_key(&"k".repeat(2000)).unwrap_err().to_string();
        assert!(error.starts_with("key may have"), "{error}");
    }
}
