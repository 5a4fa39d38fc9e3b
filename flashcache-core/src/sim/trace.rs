//! Block I/O traces: records, readers for two text formats, and a writer.
//!
//! # Formats
//!
//! **Text** ([`TraceFormat::Text`]), one request per line:
//!
//! ```text
//! # op sector count      (512-byte sectors)
//! R 2048 8
//! W 4096 16
//! ```
//!
//! `R` or `W` (either case), the first sector and the number of sectors, as
//! decimal integers separated by blanks. Blank lines are skipped, and a `#`
//! starts a comment that runs to the end of the line.
//!
//! **MSR Cambridge** ([`TraceFormat::Msr`]), the CSV of the SNIA MSR traces:
//!
//! ```text
//! Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime
//! 128166372003061629,hm,1,Read,3216171520,65536,65885
//! ```
//!
//! Seven comma-separated fields; `Type` is `Read` or `Write` (any case), and
//! `Offset` and `Size` are in bytes. A request that is not sector-aligned is
//! widened to the sectors it touches. A header line (first field
//! `Timestamp`), blank lines and `#` comment lines are skipped; the timestamp,
//! host, disk number and response time are not used.
//!
//! [`TraceFormat::Auto`] decides from the first line with content: a comma
//! makes it MSR, anything else text.
//!
//! Every bad line is a [`TraceError`] naming its 1-based line number; a
//! request of zero length, one whose last sector does not fit in 64 bits and
//! one of 2³² sectors or more are bad lines too.
//!
//! ```
//! use flashcache_core::sim::{TraceFormat, TraceOp, TraceReader, TraceRecord};
//! let text = "# a tiny trace\nR 0 8\n\nW 16 4\n";
//! let records: Vec<TraceRecord> =
//!     TraceReader::new(text.as_bytes(), TraceFormat::Auto).collect::<Result<_, _>>().unwrap();
//! assert_eq!(records[1], TraceRecord { op: TraceOp::Write, sector: 16, sectors: 4 });
//!
//! let bad = TraceReader::new("R 0 8\nX 8 8\n".as_bytes(), TraceFormat::Text).nth(1).unwrap();
//! assert_eq!(bad.unwrap_err().line(), 2);
//! ```

use std::fmt;
use std::io::{self, BufRead, Write};
use std::str::FromStr;

/// The direction of a traced request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TraceOp {
    /// A read.
    Read,
    /// A write.
    Write,
}

impl TraceOp {
    /// `R` or `W`, as the text format writes it.
    pub fn letter(self) -> char {
        match self {
            TraceOp::Read => 'R',
            TraceOp::Write => 'W',
        }
    }
}

/// One traced request: a range of 512-byte sectors read or written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceRecord {
    /// Read or write.
    pub op: TraceOp,
    /// The first sector.
    pub sector: u64,
    /// The number of sectors (the readers never yield 0).
    pub sectors: u32,
}

impl fmt::Display for TraceRecord {
    /// The record as a line of the text format, without the newline:
    /// `R 2048 8`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.op.letter(), self.sector, self.sectors)
    }
}

/// A trace file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TraceFormat {
    /// Decide from the first line with content: a comma means [`Msr`](Self::Msr),
    /// anything else [`Text`](Self::Text).
    Auto,
    /// `R|W <sector> <count>` lines.
    Text,
    /// The MSR Cambridge CSV.
    Msr,
}

impl TraceFormat {
    /// `auto`, `text` or `msr`.
    pub fn name(self) -> &'static str {
        match self {
            TraceFormat::Auto => "auto",
            TraceFormat::Text => "text",
            TraceFormat::Msr => "msr",
        }
    }
}

impl fmt::Display for TraceFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The name of an unknown trace format.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown trace format {0:?} (expected auto, text or msr)")]
pub struct UnknownFormat(pub String);

impl FromStr for TraceFormat {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<TraceFormat, UnknownFormat> {
        [TraceFormat::Auto, TraceFormat::Text, TraceFormat::Msr]
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownFormat(s.to_owned()))
    }
}

/// What is wrong with one line of a trace.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LineError {
    /// The line is not valid UTF-8.
    #[error("not valid UTF-8")]
    NotUtf8,
    /// A field is missing.
    #[error("missing {0}")]
    MissingField(&'static str),
    /// A text-format line has more than three fields.
    #[error("unexpected {0:?} after the sector count")]
    ExtraField(String),
    /// An MSR line does not have seven fields.
    #[error("expected 7 comma-separated fields, found {0}")]
    FieldCount(usize),
    /// The operation is not a read or a write.
    #[error("unknown operation {0:?} (expected R or W, or Read or Write)")]
    BadOp(String),
    /// A number does not parse as an unsigned decimal integer in range.
    #[error("{field} {text:?} is not an unsigned integer in range")]
    BadNumber {
        /// Which field.
        field: &'static str,
        /// Its text.
        text: String,
    },
    /// The request has no length.
    #[error("zero-length request")]
    ZeroLength,
    /// The request's last sector is past the end of a 64-bit sector space.
    #[error("the request ends past sector 2^64")]
    EndOverflow,
    /// The request covers 2³² sectors (2 TiB) or more.
    #[error("request of {0} sectors is too long (at most 4294967295)")]
    TooLong(u64),
}

/// A trace could not be read: an I/O error or a bad line, with the 1-based
/// number of the line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    /// Reading failed.
    #[error("line {line}: read error: {source}")]
    Io {
        /// The line being read.
        line: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A line is not a valid record.
    #[error("line {line}: {kind}")]
    Line {
        /// The line.
        line: u64,
        /// What is wrong with it.
        kind: LineError,
    },
}

impl TraceError {
    /// The 1-based number of the line the error is about.
    pub fn line(&self) -> u64 {
        match self {
            TraceError::Io { line, .. } | TraceError::Line { line, .. } => *line,
        }
    }

    /// What is wrong with the line, for a bad line.
    pub fn line_error(&self) -> Option<&LineError> {
        match self {
            TraceError::Line { kind, .. } => Some(kind),
            TraceError::Io { .. } => None,
        }
    }
}

/// Reads trace records from any [`BufRead`], one line at a time.
///
/// An iterator of `Result<TraceRecord, TraceError>`. A bad line yields an
/// error and reading goes on with the next line, so a caller may skip bad
/// lines or stop at the first; after an I/O error the iterator ends.
#[derive(Debug)]
pub struct TraceReader<R> {
    input: R,
    format: TraceFormat,
    line: u64,
    buf: Vec<u8>,
    done: bool,
}

impl<R: BufRead> TraceReader<R> {
    /// A reader of `input` in `format`.
    pub fn new(input: R, format: TraceFormat) -> TraceReader<R> {
        TraceReader { input, format, line: 0, buf: Vec::new(), done: false }
    }

    /// The format: the one given, or for [`TraceFormat::Auto`] the one
    /// detected (still `Auto` until a line with content has been read).
    pub fn format(&self) -> TraceFormat {
        self.format
    }

    /// The number of lines read so far.
    pub fn lines_read(&self) -> u64 {
        self.line
    }

    /// Parses one line; `Ok(None)` for a line without a record.
    fn parse(&mut self, line: &str) -> Result<Option<TraceRecord>, LineError> {
        let content = line.trim();
        if content.is_empty() || content.starts_with('#') {
            return Ok(None);
        }
        if self.format == TraceFormat::Auto {
            let before_comment = content.split('#').next().unwrap_or("");
            self.format =
                if before_comment.contains(',') { TraceFormat::Msr } else { TraceFormat::Text };
        }
        match self.format {
            TraceFormat::Msr => parse_msr(content),
            _ => parse_text(content),
        }
    }
}

impl<R: BufRead> Iterator for TraceReader<R> {
    type Item = Result<TraceRecord, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            self.buf.clear();
            let line = self.line + 1;
            match self.input.read_until(b'\n', &mut self.buf) {
                Ok(0) => self.done = true,
                Ok(_) => {
                    self.line = line;
                    let buf = std::mem::take(&mut self.buf);
                    let parsed = match std::str::from_utf8(&buf) {
                        Ok(text) => self.parse(text),
                        Err(_) => Err(LineError::NotUtf8),
                    };
                    self.buf = buf;
                    match parsed {
                        Ok(Some(record)) => return Some(Ok(record)),
                        Ok(None) => {}
                        Err(kind) => return Some(Err(TraceError::Line { line, kind })),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    self.done = true;
                    return Some(Err(TraceError::Io { line, source }));
                }
            }
        }
        None
    }
}

/// Reads a whole trace into memory, stopping at the first error.
pub fn read_trace<R: BufRead>(
    input: R,
    format: TraceFormat,
) -> Result<Vec<TraceRecord>, TraceError> {
    TraceReader::new(input, format).collect()
}

/// Writes `records` in the text format, one line each (see the
/// [module docs](self)); returns the number written.
///
/// ```
/// use flashcache_core::sim::{TraceOp, TraceRecord, write_text};
/// let mut out = Vec::new();
/// write_text(&mut out, &[TraceRecord { op: TraceOp::Read, sector: 8, sectors: 8 }]).unwrap();
/// assert_eq!(out, b"R 8 8\n");
/// ```
pub fn write_text<'a, W, I>(mut out: W, records: I) -> io::Result<u64>
where
    W: Write,
    I: IntoIterator<Item = &'a TraceRecord>,
{
    let mut n = 0;
    for record in records {
        writeln!(out, "{record}")?;
        n += 1;
    }
    out.flush()?;
    Ok(n)
}

fn number(field: &'static str, text: &str) -> Result<u64, LineError> {
    // `u64::from_str` accepts a leading `+`; a trace has no use for one.
    if text.starts_with('+') {
        return Err(LineError::BadNumber { field, text: text.to_owned() });
    }
    text.parse().map_err(|_| LineError::BadNumber { field, text: text.to_owned() })
}

/// A record of `sectors` sectors from `sector`, checked.
fn record(op: TraceOp, sector: u64, sectors: u64) -> Result<TraceRecord, LineError> {
    if sectors == 0 {
        return Err(LineError::ZeroLength);
    }
    let sectors_u32 = u32::try_from(sectors).map_err(|_| LineError::TooLong(sectors))?;
    if sector.checked_add(sectors - 1).is_none() {
        return Err(LineError::EndOverflow);
    }
    Ok(TraceRecord { op, sector, sectors: sectors_u32 })
}

fn parse_text(content: &str) -> Result<Option<TraceRecord>, LineError> {
    let content = content.split('#').next().unwrap_or("");
    let mut fields = content.split_whitespace();
    let Some(op) = fields.next() else { return Ok(None) };
    let op = match op {
        "R" | "r" => TraceOp::Read,
        "W" | "w" => TraceOp::Write,
        other => return Err(LineError::BadOp(other.to_owned())),
    };
    let sector = number("sector", fields.next().ok_or(LineError::MissingField("sector"))?)?;
    let count = number("count", fields.next().ok_or(LineError::MissingField("count"))?)?;
    if let Some(extra) = fields.next() {
        return Err(LineError::ExtraField(extra.to_owned()));
    }
    record(op, sector, count).map(Some)
}

fn parse_msr(content: &str) -> Result<Option<TraceRecord>, LineError> {
    let fields: Vec<&str> = content.split(',').map(str::trim).collect();
    if fields[0].eq_ignore_ascii_case("timestamp") {
        return Ok(None);
    }
    if fields.len() != 7 {
        return Err(LineError::FieldCount(fields.len()));
    }
    let op = if fields[3].eq_ignore_ascii_case("read") {
        TraceOp::Read
    } else if fields[3].eq_ignore_ascii_case("write") {
        TraceOp::Write
    } else {
        return Err(LineError::BadOp(fields[3].to_owned()));
    };
    let offset = number("offset", fields[4])?;
    let size = number("size", fields[5])?;
    if size == 0 {
        return Err(LineError::ZeroLength);
    }
    // Widen to whole sectors: [offset, offset + size) in bytes.
    let end = offset.checked_add(size - 1).ok_or(LineError::EndOverflow)?;
    let first = offset / 512;
    let last = end / 512;
    record(op, first, last - first + 1).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str, format: TraceFormat) -> Vec<Result<TraceRecord, (u64, LineError)>> {
        TraceReader::new(text.as_bytes(), format)
            .map(|r| r.map_err(|e| (e.line(), e.line_error().cloned().unwrap())))
            .collect()
    }

    fn rec(op: TraceOp, sector: u64, sectors: u32) -> TraceRecord {
        TraceRecord { op, sector, sectors }
    }

    #[test]
    fn text_good_lines() {
        let text = "# header comment\n\nR 0 8\n  w 4096 16   # trailing comment\r\nr\t7\t1\n   \nW 18446744073709551615 1";
        let got = read(text, TraceFormat::Text);
        assert_eq!(
            got,
            vec![
                Ok(rec(TraceOp::Read, 0, 8)),
                Ok(rec(TraceOp::Write, 4096, 16)),
                Ok(rec(TraceOp::Read, 7, 1)),
                Ok(rec(TraceOp::Write, u64::MAX, 1)),
            ]
        );
    }

    #[test]
    fn text_bad_lines_name_their_line() {
        let text = "R 0 8\n\
                    X 0 8\n\
                    R\n\
                    R 5\n\
                    R 5 8 9\n\
                    R -1 8\n\
                    R 0 abc\n\
                    R 0 0\n\
                    R 18446744073709551615 2\n\
                    R 0 4294967296\n\
                    R 18446744073709551616 1\n\
                    R +5 8\n\
                    Read 0 8\n\
                    W 8 8\n";
        let got = read(text, TraceFormat::Text);
        let bad = |field, text: &str| LineError::BadNumber { field, text: text.to_owned() };
        assert_eq!(
            got,
            vec![
                Ok(rec(TraceOp::Read, 0, 8)),
                Err((2, LineError::BadOp("X".into()))),
                Err((3, LineError::MissingField("sector"))),
                Err((4, LineError::MissingField("count"))),
                Err((5, LineError::ExtraField("9".into()))),
                Err((6, bad("sector", "-1"))),
                Err((7, bad("count", "abc"))),
                Err((8, LineError::ZeroLength)),
                Err((9, LineError::EndOverflow)),
                Err((10, LineError::TooLong(1 << 32))),
                Err((11, bad("sector", "18446744073709551616"))),
                Err((12, bad("sector", "+5"))),
                Err((13, LineError::BadOp("Read".into()))),
                Ok(rec(TraceOp::Write, 8, 8)),
            ]
        );
    }

    #[test]
    fn not_utf8_is_a_bad_line() {
        let bytes: &[u8] = b"R 0 8\nR \xff 8\nW 1 1\n";
        let got: Vec<_> = TraceReader::new(bytes, TraceFormat::Text).collect();
        assert_eq!(got.len(), 3);
        let err = got[1].as_ref().unwrap_err();
        assert_eq!((err.line(), err.line_error()), (2, Some(&LineError::NotUtf8)));
        assert!(got[2].is_ok());
    }

    #[test]
    fn msr_good_lines() {
        let text = "Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime\n\
                    128166372003061629,hm,1,Read,3216171520,65536,65885\n\
                    128166372016382155,hm,1,write,4096,512,1\n\
                    \n\
                    128166372016382155,hm,1,Write,1000,100,1\n\
                    1,src,0,READ,511,2,1\n";
        assert_eq!(
            read(text, TraceFormat::Msr),
            vec![
                Ok(rec(TraceOp::Read, 3216171520 / 512, 128)),
                Ok(rec(TraceOp::Write, 8, 1)),
                // Bytes 1000..1100 are within sectors 1..=2.
                Ok(rec(TraceOp::Write, 1, 2)),
                // Bytes 511..513 straddle sectors 0 and 1.
                Ok(rec(TraceOp::Read, 0, 2)),
            ]
        );
    }

    #[test]
    fn msr_bad_lines_name_their_line() {
        let text = "1,hm,1,Read,0,4096,1\n\
                    1,hm,1,Read,0,4096\n\
                    1,hm,1,Trim,0,4096,1\n\
                    1,hm,1,Read,x,4096,1\n\
                    1,hm,1,Read,0,-4096,1\n\
                    1,hm,1,Read,0,0,1\n\
                    1,hm,1,Read,18446744073709551615,2,1\n\
                    1,hm,1,Read,0,2199023255552,1\n\
                    1,hm,1,Read,0,4096,1,9\n\
                    R 0 8\n\
                    1,hm,1,Write,4096,4096,1\n";
        let bad = |field, text: &str| LineError::BadNumber { field, text: text.to_owned() };
        assert_eq!(
            read(text, TraceFormat::Msr),
            vec![
                Ok(rec(TraceOp::Read, 0, 8)),
                Err((2, LineError::FieldCount(6))),
                Err((3, LineError::BadOp("Trim".into()))),
                Err((4, bad("offset", "x"))),
                Err((5, bad("size", "-4096"))),
                Err((6, LineError::ZeroLength)),
                Err((7, LineError::EndOverflow)),
                Err((8, LineError::TooLong(1 << 32))),
                Err((9, LineError::FieldCount(8))),
                Err((10, LineError::FieldCount(1))),
                Ok(rec(TraceOp::Write, 8, 8)),
            ]
        );
    }

    #[test]
    fn auto_detects_from_the_first_line_with_content() {
        let mut msr =
            TraceReader::new("# c\n\n1,hm,1,Read,0,512,1\n".as_bytes(), TraceFormat::Auto);
        assert_eq!(msr.format(), TraceFormat::Auto);
        assert_eq!(msr.next().unwrap().unwrap(), rec(TraceOp::Read, 0, 1));
        assert_eq!(msr.format(), TraceFormat::Msr);
        assert_eq!(msr.lines_read(), 3);

        let mut text =
            TraceReader::new("W 1 1\n1,hm,1,Read,0,512,1\n".as_bytes(), TraceFormat::Auto);
        assert!(text.next().unwrap().is_ok());
        assert_eq!(text.format(), TraceFormat::Text);
        assert_eq!(text.next().unwrap().unwrap_err().line(), 2);

        let header = "Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime\n";
        let mut with_header = TraceReader::new(header.as_bytes(), TraceFormat::Auto);
        assert!(with_header.next().is_none());
        assert_eq!(with_header.format(), TraceFormat::Msr);
    }

    #[test]
    fn io_errors_end_the_iteration() {
        struct Failing(u8);
        impl io::Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("boom"));
                }
                self.0 -= 1;
                buf[..6].copy_from_slice(b"R 0 8\n");
                Ok(6)
            }
        }
        let reader = io::BufReader::with_capacity(6, Failing(2));
        let got: Vec<_> = TraceReader::new(reader, TraceFormat::Text).collect();
        assert_eq!(got.len(), 3);
        assert!(got[0].is_ok() && got[1].is_ok());
        assert!(matches!(&got[2], Err(TraceError::Io { line: 3, .. })));
        assert!(got[2].as_ref().unwrap_err().to_string().starts_with("line 3: read error"));
    }

    #[test]
    fn written_text_reads_back() {
        let records = vec![
            rec(TraceOp::Read, 0, 8),
            rec(TraceOp::Write, 123_456_789_012, 1),
            rec(TraceOp::Read, u64::MAX - 7, 8),
        ];
        let mut out = Vec::new();
        assert_eq!(write_text(&mut out, &records).unwrap(), 3);
        assert_eq!(read_trace(&out[..], TraceFormat::Auto).unwrap(), records);
        let err = read_trace("R 0 8\nR 0\n".as_bytes(), TraceFormat::Auto).unwrap_err();
        assert_eq!(err.to_string(), "line 2: missing count");
    }

    #[test]
    fn format_names() {
        assert_eq!("MSR".parse::<TraceFormat>(), Ok(TraceFormat::Msr));
        assert_eq!("text".parse::<TraceFormat>(), Ok(TraceFormat::Text));
        assert!("csv".parse::<TraceFormat>().is_err());
    }
}
