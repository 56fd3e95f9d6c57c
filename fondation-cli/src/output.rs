//! Printing results: JSON in the protobuf JSON mapping (the same field names and formats grpcurl
//! shows: RFC 3339 times, durations as `"1.5s"`), one object per line; or tables that fit an
//! 80-column terminal.

use std::{io::Write, sync::OnceLock};

use comfy_table::{presets::NOTHING, ColumnConstraint, ContentArrangement, Table};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

/// Width of the tables when the terminal's is unknown (output piped to a file or a program).
const DEFAULT_WIDTH: u16 = 80;

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(fondation_proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set built with the crate decodes")
    })
}

/// A generated message of package `fondation.v1`, named `name` there, as one line of JSON in the
/// protobuf JSON mapping.
pub fn json_line<M: prost::Message>(message: &M, name: &str) -> String {
    let descriptor = pool()
        .get_message_by_name(&format!("fondation.v1.{name}"))
        .expect("every Admin message is in the descriptor set");
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .expect("a message re-decodes with its own descriptor");
    let mut serializer = serde_json::Serializer::new(Vec::new());
    dynamic
        .serialize_with_options(&mut serializer, &SerializeOptions::new())
        .expect("serializing to memory does not fail");
    String::from_utf8(serializer.into_inner()).expect("serde_json writes UTF-8")
}

/// Prints `line` and a line break to standard output.
pub fn print_line(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// Keeps column `index` of `table` whole (ids people copy), letting the other columns wrap.
pub fn keep_whole(table: &mut Table, index: usize) {
    if let Some(column) = table.column_mut(index) {
        column.set_constraint(ColumnConstraint::ContentWidth);
    }
}

/// A borderless table with `header` (none when empty), sized to the terminal (80 columns when
/// there is none); long cells are wrapped rather than pushing the table wider.
pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_style(NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic);
    if !header.is_empty() {
        table.set_header(header.iter().copied());
    }
    if table.width().is_none() {
        table.set_width(DEFAULT_WIDTH);
    }
    table
}

/// A time as people read it (`2026-11-30 09:25:03Z`), or `-` when unset.
pub fn time(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp
        .and_then(|t| jiff::Timestamp::new(t.seconds, t.nanos).ok())
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|| "-".into())
}

/// A time in a table, short enough to fit its column (`11-30 09:25:03`, UTC), or `-`.
pub fn short_time(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp
        .and_then(|t| jiff::Timestamp::new(t.seconds, t.nanos).ok())
        .map(|t| t.strftime("%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

/// A span as people read it (`1h 2m 3s`, `450ms`), or `-` when unset.
pub fn duration(duration: Option<&prost_types::Duration>) -> String {
    let Some(d) = duration else {
        return "-".into();
    };
    // A span computed from two clocks can come out below zero: shown as 0ms.
    let total_ms = (d.seconds.saturating_mul(1000) + i64::from(d.nanos / 1_000_000)).max(0);
    if total_ms < 1000 {
        return format!("{total_ms}ms");
    }
    let seconds = total_ms / 1000;
    let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m {s}s"),
        _ => format!("{h}h {m}m {s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fondation_proto::pb;

    #[test]
    fn json_uses_the_protobuf_mapping() {
        let job = pb::Job {
            job_id: "j1".into(),
            current_step: 3,
            created_at: Some(prost_types::Timestamp {
                seconds: 1_796_030_703,
                nanos: 610_000_000,
            }),
            ..Default::default()
        };
        let value: serde_json::Value = serde_json::from_str(&json_line(&job, "Job")).unwrap();
        assert_eq!(value["jobId"], "j1");
        assert_eq!(value["currentStep"], 3);
        assert_eq!(value["createdAt"], "2026-11-30T09:25:03.610Z");
    }

    #[test]
    fn spans_read_like_people_write_them() {
        let span = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        assert_eq!(duration(span(0, 450_000_000).as_ref()), "450ms");
        assert_eq!(duration(span(59, 0).as_ref()), "59s");
        assert_eq!(duration(span(3_723, 0).as_ref()), "1h 2m 3s");
        assert_eq!(duration(None), "-");
        // The follow summary subtracts two Timestamps field by field.
        assert_eq!(duration(span(1, -200_000_000).as_ref()), "800ms");
        assert_eq!(duration(span(-1, 0).as_ref()), "0ms");
    }

    #[test]
    fn tables_fit_eighty_columns() {
        let mut table = table(&["JOB", "STATUS", "REPOSITORY"]);
        let id = "a".repeat(32);
        table.add_row([
            id.clone(),
            "running".into(),
            "https://example.com/".repeat(10),
        ]);
        keep_whole(&mut table, 0);
        let shown = table.to_string();
        for line in shown.lines() {
            assert!(
                line.chars().count() <= 80,
                "{line:?} is wider than 80 columns"
            );
        }
        assert!(shown.contains(&id), "the id is not wrapped:\n{shown}");
    }
}
