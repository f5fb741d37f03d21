//! OpenTelemetry traces: a span per command, its parent the publisher's `traceparent` (and
//! `tracestate`), with a child span per stage, exported over OTLP/HTTP when
//! `traces.otlp_endpoint` is set. Off (the default), nothing is made: every function here
//! checks one static and returns, and results carry the publisher's context as sent.
//!
//! The command's span travels as the current OpenTelemetry context of its future
//! ([`within`]), so a stage anywhere below (the pipeline, a session's actor) makes its child
//! span with [`stage`] without the span being passed down.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::future::Either;
use opentelemetry::context::{FutureExt, WithContext};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

pub use opentelemetry::Context as TraceContext;
pub use opentelemetry::KeyValue as Attribute;
pub use opentelemetry::trace::SpanKind as Kind;

/// The tracer of the process, once a worker started with an endpoint.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The exporter's end: [`Exporting::shutdown`] sends what is still buffered.
pub struct Exporting {
    provider: SdkTracerProvider,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot start the OTLP exporter: {0}")]
pub struct TracesError(String);

/// Starts exporting to `endpoint` (OTLP/HTTP; none when empty), sampling `sample_ratio` of the
/// traces no publisher decided on. One tracer per process: a second worker in the same
/// process exports through the first one's.
pub fn start(
    endpoint: &str,
    service_name: &str,
    sample_ratio: f64,
) -> Result<Option<Exporting>, TracesError> {
    if endpoint.is_empty() {
        return Ok(None);
    }
    let endpoint = endpoint.trim_end_matches('/');
    let endpoint = match endpoint.ends_with("/v1/traces") {
        true => endpoint.to_owned(),
        false => format!("{endpoint}/v1/traces"),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| TracesError(e.to_string()))?;
    let root = Sampler::TraceIdRatioBased(sample_ratio);
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(root)))
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_owned())
                .build(),
        )
        .build();
    let _ = TRACER.set(provider.tracer(env!("CARGO_PKG_NAME")));
    Ok(Some(Exporting { provider }))
}

impl Exporting {
    /// Exports what is buffered and stops; blocks (for at most the export timeout).
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "Could not export the last spans.");
        }
    }
}

fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// Headers as a propagator reads and writes them.
struct Carrier<'a>(HashMap<&'static str, &'a str>);

impl opentelemetry::propagation::Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).copied()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().copied().collect()
    }
}

/// A command's span, started with the publisher's trace context as its parent (a root span
/// when there is none). `None` when tracing is off.
pub fn command(
    name: impl FnOnce() -> String,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
    attributes: impl FnOnce() -> Vec<KeyValue>,
) -> Option<Context> {
    let tracer = tracer()?;
    let mut headers = HashMap::new();
    if let Some(tp) = traceparent {
        headers.insert("traceparent", tp);
    }
    if let Some(ts) = tracestate {
        headers.insert("tracestate", ts);
    }
    let parent = TraceContextPropagator::new().extract(&Carrier(headers));
    let span = tracer
        .span_builder(name())
        .with_kind(SpanKind::Consumer)
        .with_attributes(attributes())
        .start_with_context(tracer, &parent);
    Some(parent.with_span(span))
}

/// `work` with `cx` (a command's span) as its current context; the span ends when the future
/// is dropped. A plain function returning either future, not an `async fn`: an `async fn`
/// would hold `work` twice (as its argument and as what it awaits), and this wraps every
/// command's whole future.
pub fn within<F: Future>(cx: Option<Context>, work: F) -> Either<WithContext<F>, F> {
    match cx {
        Some(cx) => Either::Left(work.with_context(cx)),
        None => Either::Right(work),
    }
}

/// The current context, to carry across a task or channel (`None` when tracing is off).
pub fn carry() -> Option<Context> {
    tracer()?;
    Some(Context::current())
}

/// `work` in a child span of the current command span, which ends when the future is dropped
/// (once it is done, or given up). Built when called: call it inside the command's future.
pub fn stage<F: Future>(name: &'static str, kind: SpanKind, work: F) -> Either<WithContext<F>, F> {
    within(child(name, kind), work)
}

/// As [`stage`], for a step that does not wait.
pub fn stage_now<T>(name: &'static str, kind: SpanKind, work: impl FnOnce() -> T) -> T {
    let Some(cx) = child(name, kind) else {
        return work();
    };
    let out = work();
    cx.span().end();
    out
}

fn child(name: &'static str, kind: SpanKind) -> Option<Context> {
    let tracer = tracer()?;
    let parent = Context::current();
    if !parent.has_active_span() {
        return None;
    }
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .start_with_context(tracer, &parent);
    Some(parent.with_span(span))
}

/// Adds attributes to the current span (a stage's or the command's).
pub fn annotate(attributes: impl FnOnce() -> Vec<KeyValue>) {
    if tracer().is_none() {
        return;
    }
    let cx = Context::current();
    if cx.has_active_span() {
        cx.span().set_attributes(attributes());
    }
}

/// Marks the current span failed, with `description`.
pub fn failed(description: String) {
    if tracer().is_none() {
        return;
    }
    let cx = Context::current();
    if cx.has_active_span() {
        cx.span().set_status(Status::error(description));
    }
}

/// The trace context a published message carries: the current span's while tracing (so the
/// consumer of a result sees it as the worker's child), else what the command carried.
pub fn outgoing<'a>(
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
) -> (Option<Cow<'a, str>>, Option<Cow<'a, str>>) {
    let passed = || {
        (
            traceparent.map(Cow::Borrowed),
            tracestate.map(Cow::Borrowed),
        )
    };
    if tracer().is_none() {
        return passed();
    }
    let cx = Context::current();
    if !cx.span().span_context().is_valid() {
        return passed();
    }
    let mut headers: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut headers);
    (
        headers.remove("traceparent").map(Cow::Owned),
        headers
            .remove("tracestate")
            .filter(|s| !s.is_empty())
            .map(Cow::Owned),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_everything_passes_through_and_nothing_is_made() {
        // No worker in this test binary sets an endpoint.
        assert!(command(|| "process x".into(), None, None, Vec::new).is_none());
        assert!(carry().is_none());
        assert_eq!(stage_now("x", SpanKind::Internal, || 7), 7);
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            outgoing(Some(tp), Some("k=v")),
            (Some(Cow::Borrowed(tp)), Some(Cow::Borrowed("k=v")))
        );
    }
}
