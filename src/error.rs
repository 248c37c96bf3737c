//! One error type for the whole crate, grouped by who is at fault.

use std::path::PathBuf;

use datafusion::error::DataFusionError;

/// Result alias used across flumen.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in flumen.
///
/// Messages are one paragraph, say what is wrong and, where the user can act, what to do.
/// They never contain secrets: values of secret variables and URL passwords are redacted by the
/// engine before a message leaves it (see [`crate::engine::Redactor`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `${VAR}` in a script has no value from `--set` or the environment.
    #[error(
        "line {line}: variable ${{{name}}} is not set; pass --set {name}=VALUE, export {name}, or write ${{{name}:-default}}"
    )]
    UnsetVariable {
        /// Variable name.
        name: String,
        /// 1-based line in the script.
        line: usize,
    },

    /// A script could not be split into statements (unterminated string or comment, bad `${`).
    #[error("line {line}: {message}")]
    Syntax {
        /// 1-based line in the script.
        line: usize,
        /// What is wrong.
        message: String,
    },

    /// A statement of a script failed; wraps the cause with the script position.
    #[error(
        "{}statement at line {line}: {source}\n  statement: {statement}",
        script_prefix(script)
    )]
    Statement {
        /// Script name as the user gave it.
        script: String,
        /// 1-based line of the statement's first token.
        line: usize,
        /// The statement's first line, redacted, shortened.
        statement: String,
        /// What went wrong.
        #[source]
        source: Box<Error>,
    },

    /// An error in a script that is not tied to one statement (splitting, substitution).
    #[error("{script}: {source}")]
    InScript {
        /// Script name as the user gave it.
        script: String,
        /// What went wrong.
        #[source]
        source: Box<Error>,
    },

    /// Rows of a write could not be delivered: they wait in staging for `flumen resume`. The
    /// write read its whole input, so every row is delivered, staged or in dead letters.
    #[error(
        "table {table}: {rows} rows in {parts} parts could not be delivered ({reason}); they are staged in {} — run `{resume}` once the sink is back",
        dir.display()
    )]
    Staged {
        /// The sink table.
        table: String,
        /// Rows staged by this write.
        rows: u64,
        /// Parts staged by this write.
        parts: u64,
        /// The last failure.
        reason: String,
        /// The table's staging folder.
        dir: PathBuf,
        /// The command that delivers them.
        resume: String,
    },

    /// A table option is unknown, missing or has a bad value.
    #[error("{0}")]
    Option(String),

    /// Invalid command-line or engine configuration.
    #[error("{0}")]
    Config(String),

    /// Reading or writing a local file failed.
    #[error("{context}: {source}")]
    Io {
        /// What flumen was doing, naming the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A script file could not be read.
    #[error("cannot read script {}: {source}", path.display())]
    Script {
        /// The path given.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Arrow failed (encoding, casting, writing).
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),

    /// Parquet failed.
    #[error(transparent)]
    Parquet(#[from] parquet::errors::ParquetError),

    /// An object store (S3, GCS, Azure, HTTP, local) failed.
    #[error(transparent)]
    ObjectStore(#[from] object_store::Error),

    /// DataFusion failed: planning, execution, resources.
    #[error("{}", describe_datafusion(.0))]
    DataFusion(#[source] Box<DataFusionError>),
}

impl Error {
    /// Whether the error is a write whose undelivered rows are all staged (the write itself
    /// consumed its input), wherever it is wrapped.
    pub fn is_staged(&self) -> bool {
        match self {
            Error::Staged { .. } => true,
            Error::Statement { source, .. } | Error::InScript { source, .. } => source.is_staged(),
            Error::DataFusion(df) => matches!(
                df.find_root(),
                DataFusionError::External(e) if e.downcast_ref::<Error>().is_some_and(Error::is_staged)
            ),
            _ => false,
        }
    }

    /// Wraps an IO error with what flumen was doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        // A flumen error that travelled through DataFusion comes back as itself.
        match e {
            DataFusionError::External(inner) => match inner.downcast::<Error>() {
                Ok(own) => *own,
                Err(other) => Error::DataFusion(Box::new(DataFusionError::External(other))),
            },
            DataFusionError::Context(ctx, inner) if matches!(*inner, DataFusionError::External(_)) => {
                match Error::from(*inner) {
                    Error::DataFusion(df) => Error::DataFusion(Box::new(DataFusionError::Context(ctx, df))),
                    own => own,
                }
            }
            other => Error::DataFusion(Box::new(other)),
        }
    }
}

impl From<Error> for DataFusionError {
    fn from(e: Error) -> Self {
        match e {
            Error::DataFusion(df) => *df,
            other => DataFusionError::External(Box::new(other)),
        }
    }
}

fn script_prefix(script: &str) -> String {
    if script.is_empty() {
        String::new()
    } else {
        format!("{script}, ")
    }
}

/// DataFusion's own messages are good but nest prefixes ("External error: Arrow error: ...");
/// strip the wrapping so the user reads the cause first, and point at the usual fix.
fn describe_datafusion(e: &DataFusionError) -> String {
    let mut msg = cluster_task_error(&e.to_string());
    if let DataFusionError::ResourcesExhausted(_) = e.find_root() {
        msg.push_str(
            "; raise --memory-limit, or check that --spill-dir has free space so operators can spill",
        );
    }
    msg
}

/// A task's error as a Ballista cluster reports it ("Job J failed due to stage S failed: Task
/// failed due to runtime execution error: DataFusionError(Shared(External(Config(\"...\"))))")
/// with the task's own message taken out of its debug form: `job J failed on the cluster: ...`.
fn cluster_task_error(msg: &str) -> String {
    const TASK: &str = "Task failed due to runtime execution error: ";
    let Some(at) = msg.find(TASK) else {
        return msg.to_string();
    };
    let job = msg
        .split_whitespace()
        .skip_while(|w| *w != "Job")
        .nth(1)
        .unwrap_or("?")
        .to_string();
    let detail = &msg[at + TASK.len()..];
    let inner = match (detail.find("(\""), detail.rfind("\")")) {
        (Some(start), Some(end)) if end > start + 2 => detail[start + 2..end]
            .replace("\\\"", "\"")
            .replace("\\n", "\n")
            .replace("\\\\", "\\"),
        _ => detail.to_string(),
    };
    format!("job {job} failed on the cluster: {inner}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_task_error_shows_the_task_s_message() {
        let msg = "Execution error: Job 038HQ failed: Job failed due to stage 0 failed: Task failed due to runtime \
                   execution error: DataFusionError(Shared(External(Config(\"table d: 5 rows \\\"x\\\" staged\"))))";
        assert_eq!(
            cluster_task_error(msg),
            "job 038HQ failed on the cluster: table d: 5 rows \"x\" staged"
        );
        assert_eq!(cluster_task_error("plain"), "plain");
    }

    #[test]
    fn flumen_error_survives_a_trip_through_datafusion() {
        let e = Error::Option("bad option".into());
        let df: DataFusionError = e.into();
        let back = Error::from(df);
        assert!(
            matches!(back, Error::Option(ref m) if m == "bad option"),
            "{back:?}"
        );
    }

    #[test]
    fn unset_variable_names_variable_and_line() {
        let e = Error::UnsetVariable {
            name: "PG_PASSWORD".into(),
            line: 7,
        };
        let m = e.to_string();
        assert!(
            m.contains("line 7") && m.contains("${PG_PASSWORD}") && m.contains("--set PG_PASSWORD="),
            "{m}"
        );
    }
}
