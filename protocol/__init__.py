"""What SigRL is measured and trained with that comes from earlier papers, not from SigRL itself: the metrics of
the NUS-WIDE zero-shot protocol (BiAM / MKT) and of single-positive multi-label learning (metrics), and the SPML
losses IUN, AN, EM and EM_APL with its pseudo-labelling (spml_losses)."""
