//! Fault injection through failpoints (feature `failpoints`): the suite follows.
#![cfg(feature = "failpoints")]
