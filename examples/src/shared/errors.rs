//! Error reporting shared by the command-line tools (included with `#[path]`,
//! since the `examples` package has binaries only).

use std::error::Error;

/// The error of a failed run: one line for stderr.
pub type Failure = String;

/// An error and its sources on one line, skipping sources whose text the message
/// already contains, with line breaks flattened.
pub fn error_line(err: &dyn Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line.replace('\n', " ")
}
