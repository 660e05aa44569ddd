//! segmentd: batch audience segmentation and activation on embedded DuckDB.
//!
//! One run of a pipeline refreshes its master segment from source files into DuckDB
//! ([`refresh`]), evaluates every segment's rule ([`rules`], compiled to SQL by [`compile`],
//! run by [`evaluate`]), diffs each segment against what each activation's destination has
//! confirmed and pushes the delta through a connector ([`deliver`], connectors in the
//! `segmentd-connectors` crate). [`runner`] strings these steps together; [`daemon`] runs them
//! on schedules ([`scheduler`]) and HTTP triggers. [`config`] loads what the operator writes;
//! [`store`] is the only code that opens the DuckDB file.

pub mod compile;
pub mod config;
pub mod daemon;
pub mod deliver;
pub mod dialect;
pub mod evaluate;
pub mod plan;
pub mod refresh;
pub mod rules;
pub mod runner;
pub mod scheduler;
pub mod schema;
pub mod store;
