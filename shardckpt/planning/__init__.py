"""Planning: flattening states into trees and leaves, and deciding which rank writes what."""
