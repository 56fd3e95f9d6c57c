//! Reading a process's Prometheus endpoint (`METRICS_ADDR`) the way a scraper does: an HTTP GET of
//! `/metrics`, the text parsed by a Prometheus text-format parser (`prometheus-parse`), values
//! looked up by metric name and labels.

use std::{net::SocketAddr, time::Duration};

use prometheus_parse::{Sample, Scrape, Value};

/// One scrape, parsed.
pub struct Metrics {
    scrape: Scrape,
    /// The text as served, for failure messages.
    pub text: String,
}

/// GETs `http://addr/metrics` and parses it; the error says what went wrong.
pub async fn try_scrape(addr: SocketAddr) -> Result<Metrics, String> {
    let reply = reqwest::Client::new()
        .get(format!("http://{addr}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| format!("scraping {addr}: {e}"))?;
    if !reply.status().is_success() {
        return Err(format!("scraping {addr}: HTTP {}", reply.status()));
    }
    let text = reply
        .text()
        .await
        .map_err(|e| format!("reading the scrape of {addr}: {e}"))?;
    let scrape = Scrape::parse(text.lines().map(|line| Ok(line.to_owned())))
        .map_err(|e| format!("parsing the scrape of {addr}: {e}"))?;
    Ok(Metrics { scrape, text })
}

/// Like [`try_scrape`], panicking on failure.
pub async fn scrape(addr: SocketAddr) -> Metrics {
    try_scrape(addr).await.unwrap_or_else(|e| panic!("{e}"))
}

impl Metrics {
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<&Sample> {
        self.scrape.samples.iter().find(|sample| {
            sample.metric == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
    }

    /// The value of the counter or gauge sample `name` (a counter's sample ends in `_total`)
    /// whose labels include `labels`; `None` when there is no such sample.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match &self.find(name, labels)?.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
            Value::Histogram(_) | Value::Summary(_) => None,
        }
    }

    /// Like [`Metrics::value`], 0 when the sample is absent (a labelled counter appears at its
    /// first increment).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// Observations of the histogram `name` with `labels` (its `+Inf` bucket); 0 when absent.
    pub fn observations(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.find(name, labels).map(|sample| &sample.value) {
            Some(Value::Histogram(buckets)) => buckets
                .iter()
                .find(|bucket| bucket.less_than.is_infinite())
                .map_or(0.0, |bucket| bucket.count),
            _ => 0.0,
        }
    }
}
