//! Test support: namespaces and private Redis servers.
