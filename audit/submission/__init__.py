"""MLPerf submission: the checker's rules applied to wallperf's runs (rules), the
accuracy.txt the checker parses (accuracy_txt), and the official submission tree
(package)."""
