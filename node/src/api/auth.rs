//! HTTP-level guard of the local API: every request (plain HTTP or WebSocket upgrade) must
//! carry `Authorization: Bearer <token>` and must not come from a foreign web origin.
//!
//! The token is compared in constant time. A request with an `Origin` header is accepted
//! only when that origin is the API's own loopback address, so a web page open in the user's
//! browser cannot drive the daemon even if it guessed the port.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::{Future, FutureExt, TryFutureExt};
use jsonrpsee::server::{HttpBody, HttpRequest, HttpResponse};
use subtle::ConstantTimeEq;
use tower::{Layer, Service};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What the guard needs to know.
#[derive(Clone)]
pub(crate) struct AuthLayer {
    token: Arc<str>,
    allowed_origins: Arc<[String]>,
}

impl std::fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLayer")
            .field("token", &"<redacted>")
            .finish()
    }
}

impl AuthLayer {
    pub(crate) fn new(token: &str, port: u16) -> Self {
        Self {
            token: token.into(),
            allowed_origins: vec![
                format!("http://127.0.0.1:{port}"),
                format!("http://localhost:{port}"),
            ]
            .into(),
        }
    }

    fn check(&self, req: &http::HeaderMap) -> Result<(), (u16, &'static str)> {
        if let Some(origin) = req.get(http::header::ORIGIN) {
            let ok = origin
                .to_str()
                .is_ok_and(|o| self.allowed_origins.iter().any(|a| a == o));
            if !ok {
                return Err((403, "foreign Origin refused\n"));
            }
        }
        let presented = req
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or((401, "missing bearer token\n"))?;
        if presented.as_bytes().ct_eq(self.token.as_bytes()).into() {
            Ok(())
        } else {
            Err((401, "invalid bearer token\n"))
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service produced by [`AuthLayer`].
#[derive(Clone, Debug)]
pub(crate) struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S, B> Service<HttpRequest<B>> for Auth<S>
where
    S: Service<HttpRequest<B>, Response = HttpResponse>,
    S::Error: Into<BoxError> + 'static,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: HttpRequest<B>) -> Self::Future {
        match self.layer.check(request.headers()) {
            Ok(()) => Box::pin(self.inner.call(request).map_err(Into::into)),
            Err((status, text)) => {
                tracing::debug!(status, "API request refused");
                let response = HttpResponse::builder()
                    .status(status)
                    .header("content-type", "text/plain")
                    .body(HttpBody::from(text))
                    .map_err(|e| -> BoxError { Box::new(e) });
                async move { response }.boxed()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn token_and_origin_rules() {
        let layer = AuthLayer::new("s3cret", 4000);
        assert!(
            layer
                .check(&headers(&[("authorization", "Bearer s3cret")]))
                .is_ok()
        );
        assert_eq!(layer.check(&headers(&[])).unwrap_err().0, 401);
        assert_eq!(
            layer
                .check(&headers(&[("authorization", "Bearer wrong")]))
                .unwrap_err()
                .0,
            401
        );
        assert_eq!(
            layer
                .check(&headers(&[("authorization", "s3cret")]))
                .unwrap_err()
                .0,
            401
        );
        assert_eq!(
            layer
                .check(&headers(&[
                    ("authorization", "Bearer s3cret"),
                    ("origin", "https://evil.example")
                ]))
                .unwrap_err()
                .0,
            403
        );
        assert!(
            layer
                .check(&headers(&[
                    ("authorization", "Bearer s3cret"),
                    ("origin", "http://127.0.0.1:4000")
                ]))
                .is_ok()
        );
        assert!(format!("{layer:?}").contains("redacted"));
        assert!(!format!("{layer:?}").contains("s3cret"));
    }
}
