//! kecho's durable state on disk (docs/DURABILITY.md):
//!
//! - [`log`]: a segmented append-only log with a CRC-32 per record that cuts a torn tail off on opening and refuses
//!   damage elsewhere;
//! - [`positions`]: durable (named) sinks, which keep their position per source and resume after a restart with no
//!   duplicate, reporting what they missed in between;
//! - [`record`] and [`recorder`]: the recorder member's event log (`kecho record`);
//! - [`replay`]: how sinks that come back or join late ask the recorders for what they missed.
//!
//! Why a log of our own rather than an embedded store: the data is append-only and read in order, the records are
//! opaque, and recovery must say exactly what it cut off; a log of a few hundred lines does that, with nothing to
//! tune and no compaction pauses.

pub mod log;
pub mod positions;
pub mod record;
pub mod recorder;
pub mod replay;

pub use log::{Log, LogError, LogOptions, Opened};
pub use positions::{Admit, CatchUp, DurableError, DurableSink, Gap, Positions, Unknown};
pub use record::{DecodeError, Recorded};
pub use recorder::{Index, OpenReport, Recorder, RecorderError, Seen, SegmentSummary};
pub use replay::{Answer, Ask, Filters, RecorderId, ReplayClient, ReplayError, Request};
