//! Log lines for the systemd journal. Under systemd, a service's stderr is a stream into the
//! journal, which stamps every line with its own time and reads a leading `<N>` (a syslog
//! priority, as sd-daemon(3) describes) as the line's priority. So when stderr is that
//! stream, kiln writes `<N>message key=value` lines: the priority first, no time and no
//! colour. `--log-format json` stays JSON whatever stderr is.
//!
//! systemd tells a service which stream is the journal's: `JOURNAL_STREAM=<dev>:<inode>` of
//! that stream. A child of the service inherits the variable with stderr redirected
//! elsewhere, so the variable alone proves nothing: stderr's own device and inode must match
//! (as systemd.exec(5) asks programs to check).

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Whether stderr is the journal's stream: `JOURNAL_STREAM` names stderr's device and inode.
pub fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    names_stream(&stream.to_string_lossy(), stat.st_dev, stat.st_ino)
}

/// Whether `JOURNAL_STREAM`'s value (`<dev>:<inode>`, both decimal) names this device and
/// inode.
fn names_stream(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

/// The syslog priority of a `tracing` level: error 3, warning 4, info 6 (notice, 5, is
/// for what deserves more attention than info; `tracing` has no such level), debug and
/// trace 7.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// The priority prefix of a line at `level`: `<3>` … `<7>`.
pub fn prefix(level: Level) -> String {
    format!("<{}>", priority(level))
}

/// The journal's line format for `tracing_subscriber::fmt`: the priority prefix, the spans
/// the event is in (`name{fields}: `, as the human format shows them), then the message and
/// its fields. No time (the journal has its own), no level word (the prefix is the level)
/// and no colour.
pub struct JournalFormat;

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "{}", prefix(*event.metadata().level()))?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                write!(writer, "{}", span.name())?;
                let ext = span.extensions();
                match ext.get::<FormattedFields<N>>() {
                    Some(fields) if !fields.is_empty() => write!(writer, "{{{fields}}}: ")?,
                    _ => write!(writer, ": ")?,
                }
            }
        }
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_level_gets_its_syslog_priority() {
        let cases = [
            (Level::ERROR, "<3>"),
            (Level::WARN, "<4>"),
            (Level::INFO, "<6>"),
            (Level::DEBUG, "<7>"),
            (Level::TRACE, "<7>"),
        ];
        for (level, want) in cases {
            assert_eq!(prefix(level), want, "{level}");
        }
    }

    #[test]
    fn journal_stream_must_name_stderrs_device_and_inode() {
        assert!(names_stream("64769:1234", 64769, 1234));
        assert!(!names_stream("64769:1234", 64769, 1235));
        assert!(!names_stream("64770:1234", 64769, 1234));
        for broken in [
            "",
            ":",
            "64769",
            "64769:",
            ":1234",
            "x:1234",
            "64769:1234:5",
            "-1:1234",
        ] {
            assert!(!names_stream(broken, 64769, 1234), "{broken:?}");
        }
    }
}
