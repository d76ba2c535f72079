//! The proxy's admin HTTP interface (issue 3). Placeholder until it lands.
